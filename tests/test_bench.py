"""The benchmark suite (``benchmarks/``, outside the package) keeps working: smoke mode end to end,
and its parts. Never timings."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from benchmarks import gpt2, models, page, peers, report, summary
from benchmarks.cli import DEFAULT_OUT, main
from benchmarks.original import OriginalReparamModule
from benchmarks.population import _never_slower
from benchmarks.report import Table, at_least, at_most
from benchmarks.timing import Budget, Timing, compare, median_ratio, slope
from torchreparam.__main__ import main as torchreparam_main

REPO = Path(__file__).resolve().parents[1]

# Every target, by the start of its table's title.
TARGETS = [
    "Forward with another flat vector, MLP 16-32-32-4",
    "Forward+backward to the flat vector, MLP 16-32-32-4",
    "Overhead per parameter tensor, no grad",
    "Overhead per parameter tensor, forward, grad enabled",
    "MAML meta-step, MLP 16-32-32-4",
    "Population of 8 flat vectors, MLP 16-32-32-4",
    "Population of 8 flat vectors, 4-block conv net",
    "Population of 8 digits-sized CNNs",
    "Population of 8 digits-sized residual CNNs (batch 25, 8x8), no grad, tuned allocator",
    "Population of 8 transformer blocks (2 heads, width 32, sequence 16, batch 4), no grad",
    "Population of 8 transformer blocks (2 heads, width 32, sequence 16, batch 4), forward+backward",
    "ResNet-18 forward+backward to the flat vector, tuned allocator",
    "Wrapping ResNet-18",
    "Adam step,",
]
PEERS = [
    peers.PLAIN,
    peers.OURS,
    peers.ORIGINAL,
    peers.FUNC_FLAT,
    peers.FUNC_PREBUILT,
    peers.V2P,
]


def _section(text: str, title: str) -> str:
    """The markdown from the heading ``### title...`` to the next heading."""
    start = text.index(f"### {title}")
    end = text.find("\n#", start + 1)
    return text[start : end if end >= 0 else None]


@pytest.fixture(scope="module")
def smoke_page(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("bench") / "benchmarks.md"
    assert main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    return out.read_text()


def test_smoke_page_has_every_target(smoke_page: str) -> None:
    summary = _section(smoke_page, "Targets, CPU")
    for title in TARGETS:
        assert f"| {title}" in summary, title
        assert f"### {title}" in smoke_page, title
    verdicts = re.findall(r"^\| [^|]+ \| .+ \| (\w+)", summary, re.M)[1:]  # (after the header)
    assert len(verdicts) == len(TARGETS)
    assert set(verdicts) <= {"met", "missed"}


def test_smoke_page_opens_with_a_summary_and_ends_with_the_method(smoke_page: str) -> None:
    order = [
        smoke_page.index(heading)
        for heading in ("## In short", "## CPU, one thread", "### Forward with", "### Targets, CPU")
    ]
    order += [smoke_page.index("## Method"), smoke_page.index("## Allocator note")]
    assert order == sorted(order)
    short = smoke_page[order[0] : order[1]]
    assert "faster than `functional_call` from the same vector" in short
    assert "Measured on " in short
    rows = re.findall(r"^\| \[(.+?)\]\(#([\w-]+)\) \|", short, re.M)
    assert len(rows) >= 6
    anchors = {summary.slug(h) for h in re.findall(r"^### (.+)$", smoke_page, re.M)}
    assert {anchor for _, anchor in rows} <= anchors  # every row links to its table


def test_page_reads_back_what_it_wrote(smoke_page: str) -> None:
    body = page._section_of(smoke_page, "cpu")
    assert body is not None
    section = report.parse_section(body)
    assert report.render_section(section).strip() == body
    assert page.compose_page({}, smoke_page) == smoke_page  # --rewrite changes nothing


def test_smoke_page_states_the_environment(smoke_page: str) -> None:
    for field in ("| machine |", "| torch |", "| threads | torch.set_num_threads(1) |", "| date |"):
        assert field in smoke_page
    assert torch.__version__ in smoke_page
    assert "MALLOC_MMAP_THRESHOLD_=2147483647" in smoke_page
    assert "<!-- bench:cpu -->" in smoke_page
    assert "<!-- bench:cuda -->" in smoke_page


def test_smoke_forward_table_has_every_peer(smoke_page: str) -> None:
    table = _section(smoke_page, "Forward with another flat vector")
    for name in PEERS:
        assert re.search(rf"\| {re.escape(name)} \| [\d.]+ (µs|ms|s) \| [\d.]+x \|", table), name
    higher_row = re.search(rf"\| {re.escape(peers.HIGHER)} \|(.*)\n", table)
    assert higher_row is not None
    skipped = "skipped: higher is not installed" in higher_row.group(1)
    assert skipped == (peers.higher is None)


def test_smoke_optional_models(smoke_page: str) -> None:
    if gpt2.available():
        assert "### Forward+backward, GPT-2" in smoke_page
    else:
        assert "skipped: transformers is not installed" in smoke_page


def test_smoke_both_allocators_and_the_wrap(smoke_page: str) -> None:
    for allocator in ("default", "tuned"):
        table = _section(smoke_page, f"ResNet-18 forward+backward to the flat vector, {allocator}")
        assert f"| {peers.OURS} |" in table
    wrap = _section(smoke_page, "Wrapping ResNet-18")
    assert "| torchreparam | +" in wrap
    assert "| original torchreparam | +" in wrap


def test_only_one_case_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--smoke", "--only", "forward", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "### Forward with another flat vector" in out
    assert "MAML" not in out


def test_unknown_case_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--only", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_runs_as_python_dash_m_from_anywhere(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert "--smoke" in done.stdout
    assert "--only" in done.stdout
    assert DEFAULT_OUT == REPO / "docs" / "benchmarks.md"  # not relative to the cwd


def test_the_package_says_where_the_suite_went(capsys: pytest.CaptureFixture[str]) -> None:
    assert torchreparam_main(["bench", "--smoke"]) == 2
    assert "python -m benchmarks" in capsys.readouterr().err


def _private_imports(source: str) -> set[str]:
    """``torchreparam`` names imported by ``source`` that start with an underscore."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torchreparam"):
            names = [*node.module.split(".")[1:], *(a.name for a in node.names)]  # type: ignore[union-attr]
        elif isinstance(node, ast.Import):
            names = [
                p
                for a in node.names
                if a.name.startswith("torchreparam.")
                for p in a.name.split(".")
            ]
        else:
            continue
        found |= {n for n in names if n.startswith("_")}
    return found


def test_the_suite_imports_only_the_public_api() -> None:
    found = {
        (f.name, n)
        for f in (REPO / "benchmarks").glob("*.py")
        for n in _private_imports(f.read_text())
    }
    assert found == {("models.py", "_resnet")}  # the one named exception (benchmarks/__init__.py)


def _device_section(title: str, text: str) -> str:
    return f"## {title}\n\n{text}\n\n|  |  |\n| --- | --- |\n| machine | {text} |\n"


def test_page_keeps_the_sections_it_did_not_measure(tmp_path: Path) -> None:
    path = tmp_path / "b.md"
    page.write_page(path, {"cuda": _device_section("CUDA", "gpu figures")})
    page.write_page(path, {"cpu": _device_section("CPU, one thread", "cpu figures")})
    text = path.read_text()
    assert "gpu figures" in text
    assert "cpu figures" in text
    page.write_page(path, {"cpu": _device_section("CPU, one thread", "new cpu figures")})
    text = path.read_text()
    assert "new cpu figures" in text
    assert text.count("cpu figures") == 2  # intro and table, the old ones gone


def test_merge_puts_a_partial_runs_tables_into_the_page(tmp_path: Path) -> None:
    path = tmp_path / "b.md"
    path.write_text(DEFAULT_OUT.read_text())
    before = report.parse_section(page._section_of(path.read_text(), "cpu") or "")
    old = before.tables[0]
    new = Table("x", old.title, "", "", old.headers, [tuple("1" for _ in old.headers)])
    extra = Table("x", "A new table", "", "", ("a", "b"), [("1", "2")])
    page.merge_tables(path, "cpu", [new, extra], "measured today")
    after = report.parse_section(page._section_of(path.read_text(), "cpu") or "")
    assert [t.title for t in after.tables] == [*(t.title for t in before.tables), "A new table"]
    assert after.tables[0].rows == new.rows
    assert after.tables[0].notes[-1] == "measured today"
    assert after.tables[1:-1] == before.tables[1:]
    with pytest.raises(ValueError, match="has no measured cuda section to merge into"):
        page.merge_tables(path, "cuda", [extra], "")


def test_compare_pairs_rounds() -> None:
    calls = {"a": 0, "b": 0}

    def bump(name: str) -> None:
        calls[name] += 1

    timings = compare(
        {"a": lambda: bump("a"), "b": lambda: bump("b")}, "a", Budget(rounds=3, block_s=1e-4)
    )
    assert list(timings) == ["a", "b"]
    assert len(timings["b"].times) == 3
    assert timings["a"].ratio == 1.0
    assert calls["a"] > 3
    assert calls["b"] > 3
    with pytest.raises(ValueError, match=re.escape("baseline 'c' is not one of ['a', 'b']")):
        compare({"a": lambda: None, "b": lambda: None}, "c", Budget(rounds=1, block_s=1e-4))


def test_statistics() -> None:
    assert median_ratio([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == 2.0
    assert slope([8, 32, 128], [1.0, 4.0, 16.0]) == pytest.approx(0.125)
    assert at_most("x", 1.2, 1.3).startswith("met")
    assert at_most("x", 1.4, 1.3).startswith("missed")
    assert at_least("x", 14.0, 13.0).startswith("met")
    assert at_least("x", 6.5, 13.0) == "missed: x 6.50x, target >= 13x (short by 50%)"


def test_table_row_lookup() -> None:
    table = Table("k", "title", "", "", ("a", "b"), [("one", "1"), ("two", "2")])
    assert table.row("two") == ("two", "2")
    assert table.row("three") is None


@pytest.mark.parametrize("factory", [models.mlp, models.conv4])
def test_original_matches_functional_call(factory: object) -> None:
    model = factory()  # type: ignore[operator]
    net, twin = model.build(), model.build()
    original = OriginalReparamModule(net)
    assert tuple(original.parameters()) == (original.flat_param,)
    theta = torch.randn(original.param_numel, requires_grad=True)
    p = peers.Peers(model)
    expected = functional_call(twin, p.dict_from(theta), model.inputs)
    got = original(*model.inputs, flat_param=theta)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    (g1,) = torch.autograd.grad(got.sum(), theta)
    (g2,) = torch.autograd.grad(expected.sum(), theta)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    torch.testing.assert_close(original(*model.inputs), twin(*model.inputs), rtol=0, atol=0)


def _installed(fn: Callable[[], object]) -> object:
    """``fn()``, or None where it is an optional peer that is not installed here."""
    try:
        return fn()
    except peers.NotInstalled:
        return None


def test_peers_agree_on_forward_and_gradient() -> None:
    p = peers.Peers(models.mlp())
    with torch.no_grad():
        outputs = {name: _installed(fn) for name, fn in peers.forward_contenders(p).items()}
    reference = outputs[peers.OURS]
    optional = [peers.TORCHOPT] if outputs[peers.TORCHOPT] is not None else []
    for name in (peers.ORIGINAL, peers.FUNC_FLAT, peers.FUNC_PREBUILT, peers.V2P, *optional):
        torch.testing.assert_close(outputs[name], reference, msg=name)
    grads = {name: _installed(fn) for name, fn in peers.backward_contenders(p).items()}
    (reference,) = grads[peers.OURS]  # type: ignore[misc]
    for name in (peers.ORIGINAL, peers.FUNC_FLAT, *optional):
        torch.testing.assert_close(grads[name][0], reference, msg=name)  # type: ignore[index]
    torch.testing.assert_close(grads[peers.V2P], reference)


def test_never_slower_verdict_allows_only_noise() -> None:
    loop = Timing("loop", (1.0,) * 8, 1.0, 1)
    noisy = Timing("ours", (0.98, 0.99, 1.0, 1.01, 1.02, 1.02, 1.03, 1.04), 1.015, 1)
    slower = Timing("ours", (1.04, 1.05, 1.05, 1.06, 1.06, 1.07, 1.07, 1.08), 1.06, 1)
    faster = Timing("ours", (0.9,) * 8, 0.9, 1)
    assert _never_slower(noisy, loop).startswith("met within noise: torchreparam 1.01x")
    assert _never_slower(slower, loop).startswith("missed: torchreparam 1.06x")
    assert _never_slower(faster, loop).startswith("met: torchreparam 0.90x")
