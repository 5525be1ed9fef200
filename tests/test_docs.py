"""Every Python block of the documentation runs.

The ```python blocks of each page (docs/**/*.md and README.md) run in order in one namespace, so
a later block can use the names of an earlier one. A block runs unless the last non-blank line
before its opening fence is one of these markers (HTML comments, invisible on the site):

- ``<!-- docs-test: needs MODULE -->``: run only when ``import MODULE`` succeeds;
- ``<!-- docs-test: skip REASON -->``: never run (only for blocks that need something absent,
  such as a GPU).

Tracebacks point at the page and the line of the Markdown file.
"""

from __future__ import annotations

import functools
import importlib
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]

# An opening fence (possibly indented, as inside content tabs), its info string, the body and
# the closing fence at the same indentation.
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=ticks)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<kind>needs|skip)\s+(?P<arg>[^>]*?)\s*-->$")
PYTHON = {"python", "py"}


@dataclass(frozen=True)
class Block:
    line: int  # line of the opening fence, 1-based
    source: str
    marker: tuple[str, str] | None  # (kind, argument)


def blocks_of(text: str) -> list[Block]:
    """The Python blocks of a Markdown text, in order, with their markers."""
    out = []
    for match in FENCE.finditer(text):
        words = match["info"].strip().split()
        if not words or words[0] not in PYTHON:
            continue
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1].strip()  # last non-blank
        found = MARKER.match(before)
        out.append(
            Block(
                line=text.count("\n", 0, match.start()) + 1,
                source=textwrap.dedent(match["body"]),
                marker=(found["kind"], found["arg"]) if found else None,
            )
        )
    return out


@functools.cache
def importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # not installed, or installed but broken (torchvision beside some torch)
        return False
    return True


def should_run(block: Block) -> str | None:
    """``None`` when the block runs, else why it does not."""
    if block.marker is None:
        return None
    kind, arg = block.marker
    if kind == "skip":
        return f"marked skip: {arg}"
    return None if importable(arg) else f"{arg} cannot be imported"


def _id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The examples are tiny: one intra-op thread is fastest for them, and keeps them fast on a
    busy machine (several OpenMP threads contending for the cores can make a small op 1000x
    slower). The previous setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("page", PAGES, ids=_id)
@pytest.mark.usefixtures("one_thread")
def test_python_blocks_of_the_page_run_in_order(page: Path) -> None:
    namespace: dict[str, object] = {"__name__": f"docs:{_id(page)}"}
    blocks, skipped = blocks_of(page.read_text()), []
    for block in blocks:
        why = should_run(block)
        if why is not None:
            skipped.append(f"line {block.line}: {why}")
            continue
        # Pad so that line numbers in tracebacks are those of the Markdown file.
        padded = "\n" * block.line + block.source
        exec(compile(padded, str(page), "exec"), namespace)
    if blocks and len(skipped) == len(blocks):
        pytest.skip("; ".join(skipped))


def test_markers_are_well_formed_and_attached_to_python_blocks() -> None:
    for page in PAGES:
        text = page.read_text()
        attached = {b.line for b in blocks_of(text) if b.marker is not None}
        lines = text.splitlines()
        for number, line in enumerate(lines, start=1):
            if "docs-test" not in line:
                continue
            assert MARKER.match(line.strip()), f"{_id(page)}:{number}: malformed marker {line!r}"
            following = next((n for n in range(number, len(lines)) if lines[n].strip()), None)
            assert following is not None, f"{_id(page)}:{number}: marker at the end of the page"
            assert following + 1 in attached, (
                f"{_id(page)}:{number}: a marker must come just before a ```python fence"
            )


def test_every_docs_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.rglob("*.md"):
        name = page.relative_to(DOCS).as_posix()
        assert re.search(rf":\s*{re.escape(name)}\s*$", config, re.MULTILINE), (
            f"docs/{name} is not in the nav of mkdocs.yml"
        )


def test_the_block_reader_sees_indented_blocks_and_markers() -> None:
    text = (
        "x\n\n<!-- docs-test: needs no_such_module_here -->\n```python\na = 1\n```\n\n"
        '=== "Tab"\n\n    ```python title="t.py"\n    b = 2\n    ```\n\n```text\nc\n```\n'
    )
    found = blocks_of(text)
    assert [(b.line, b.source, b.marker) for b in found] == [
        (4, "a = 1\n", ("needs", "no_such_module_here")),
        (10, "b = 2\n", None),
    ]
    assert should_run(found[0]) == "no_such_module_here cannot be imported"
    assert should_run(found[1]) is None


def _in_short_rows() -> dict[str, str]:
    """The benchmarks page's summary rows, by the anchor of the table each links to."""
    page = (DOCS / "benchmarks.md").read_text()
    short = page[page.index("## In short") : page.index("<!-- bench:cpu -->")]
    return dict(re.findall(r"^\| \[[^]]+\]\(#([\w-]+)\)(.*)$", short, re.MULTILINE))


@pytest.mark.parametrize("page", [ROOT / "README.md", DOCS / "index.md"], ids=_id)
def test_why_tables_quote_the_benchmarks_page(page: Path) -> None:
    """Each figure of a 'Why this one' row linked to a benchmark table is that table's figure in
    the benchmarks page's summary (measured, not typed in)."""
    text = page.read_text()
    why = text[text.index("## Why this one") :]
    why = why[: why.index("\n## ")]
    summary = _in_short_rows()
    rows = re.findall(r"^\|.*benchmarks\.md#([\w-]+)\)\)(.*)$", why, re.MULTILINE)
    assert len(rows) >= 2
    for anchor, cells in rows:
        assert anchor in summary, anchor
        for figure in re.findall(r"\d+\.\d+x", cells):
            assert figure in summary[anchor], (anchor, figure)
    assert "see Long inner loops" in why


def test_the_readme_core_test_command_names_real_files() -> None:
    readme = (ROOT / "README.md").read_text()
    pattern = r"^OMP_NUM_THREADS=1 python -m pytest (tests/.*?)\n(?!    )"
    command = re.search(pattern, readme, re.MULTILINE | re.DOTALL)
    assert command is not None
    files = command.group(1).replace("\\", " ").split()
    assert len(files) >= 5
    for name in files:
        assert (ROOT / name).is_file(), name
