"""torchreparam under torch.distributed: DDP, FSDP2, and a population split across ranks.

Two processes, spawned once for the whole module (starting processes is most of the time), run
every scenario with the gloo backend on 127.0.0.1 and write what they saw to files; the tests
compare it with one process doing the same work on the whole batch (for plain training, an
unwrapped module). The parent hosts the rendezvous store on a port the OS picks, so concurrent
runs cannot collide; every collective and the whole run have time limits. The scripts of the
distributed docs page run in the same two processes.

Also here (in-process): :func:`evaluate_population` without a process group, and what
``nn.DataParallel`` does with a ReparamModule.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from torchreparam import ReparamModule, evaluate_population

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)

WORLD = 2
STEPS = 3
BATCH = 8  # split in halves, one per rank
RUN_LIMIT = 240.0  # seconds for the whole spawned run (it takes ~15 s on 2 busy cores)
COLLECTIVE_LIMIT = timedelta(seconds=90)
EXACT = {"rtol": 0.0, "atol": 1e-12}  # float64 everywhere: one process vs two, step for step
ROOT = Path(__file__).resolve().parents[1]
# The docs page's scripts for torchrun (wherever the page lives: the docs site, or examples/).
PAGES = [*sorted((ROOT / "docs").rglob("*istributed*.md")), ROOT / "examples" / "DISTRIBUTED.md"]
TORCHRUN_BLOCK = re.compile(
    r"^<!-- docs-test: skip launched with torchrun[^\n]*-->\n```python\n(?P<body>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)


# ---- shared by the parent and the spawned processes ------------------------------------
def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 5, generator=gen, dtype=torch.float64), torch.randint(
        0, 3, (BATCH,), generator=gen
    )


def _thetas(population: int, numel: int) -> Tensor:
    gen = torch.Generator().manual_seed(2)
    return 0.5 * torch.randn(population, numel, generator=gen, dtype=torch.float64)


def _optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _member_losses(r: ReparamModule, x: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
    """``(rows, numel) -> (rows,)``: the cross-entropy of each row on (x, y)."""

    def fn(thetas: Tensor) -> Tensor:
        logits = r(x, flat_param=thetas)  # (rows, batch, classes)
        return F.cross_entropy(
            logits.transpose(1, 2), y.expand(len(thetas), -1), reduction="none"
        ).mean(1)

    return fn


def _attempt(fn: Callable[[], Any]) -> dict[str, Any]:
    """``{"value": fn()}``, or ``{"error": (type name, message)}`` if it raised."""
    try:
        return {"value": fn()}
    except Exception as exc:
        return {"error": (type(exc).__name__, str(exc))}


# ---- the scenarios, run by each of the two processes -----------------------------------
def _ddp(rank: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = _data()
    mine = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    r = ReparamModule(_model())
    ddp = DDP(r)
    opt = _optimizer(ddp.parameters())
    trajectory = []
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(ddp(x[mine]), y[mine]).backward()
        opt.step()
        trajectory.append(r.flat_param.detach().clone())
    buckets = getattr(ddp.reducer, "_get_zeros_like_grad_buckets", None)  # private: optional
    return {
        "parameters": [name for name, _ in ddp.named_parameters()],
        "buckets": None if buckets is None else [b.buffer().numel() for b in buckets()],
        "trajectory": torch.stack(trajectory),
        "module_out": r.module(x).detach(),  # the unwrapped module, after training
        "maml": _maml(lambda r: DDP(r), [(x[mine], y[mine])]),
    }


def _maml(wrap: Callable[[ReparamModule], nn.Module], tasks: list[tuple[Tensor, Tensor]]) -> Tensor:
    """MAML's outer steps over ``tasks`` (one per rank under DDP): the trajectory of flat_param.

    The inner step runs on ``r`` itself, the outer call goes through ``wrap(r)`` with the adapted
    vector; the meta-gradient (second order included) is averaged over the tasks."""
    r = ReparamModule(_model())
    outer = wrap(r)
    opt = _optimizer(outer.parameters())
    trajectory = []
    for _ in range(STEPS):
        opt.zero_grad()
        for x, y in tasks:
            inner = F.cross_entropy(r(x[::2]), y[::2])
            (g,) = torch.autograd.grad(inner, r.flat_param, create_graph=True)
            theta = r.flat_param - 0.5 * g
            (F.cross_entropy(outer(x[1::2], flat_param=theta), y[1::2]) / len(tasks)).backward()
        opt.step()
        trajectory.append(r.flat_param.detach().clone())
    return torch.stack(trajectory)


def _fsdp2(rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    x, y = _data()
    mine = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    r = ReparamModule(_model())
    fully_shard(r)
    flat = r.flat_param
    out: dict[str, Any] = {
        "sharded": isinstance(flat, DTensor) and flat.to_local().numel() < r.param_numel
    }
    opt = _optimizer(r.parameters())
    trajectory = []
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(r(x[mine]), y[mine]).backward()
        opt.step()
        trajectory.append(r.flat_param.full_tensor().detach().clone())
    out["trajectory"] = torch.stack(trajectory)
    out["still_sharded"] = isinstance(r.flat_param, DTensor)

    def state() -> dict[str, Any]:
        """The unwrapped module's state dict: its types, and its values as plain tensors."""
        got = r.module.state_dict()
        full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in got.items()}
        return {"types": {type(v).__name__ for v in got.values()}, "values": full}

    r.unshard()  # FSDP2's public API: the full flat_param, until reshard()
    out["unsharded_out"] = _attempt(lambda: r.module(x).detach())
    out["unsharded_state"] = _attempt(state)
    r.reshard()
    sharded = r.flat_param  # (a forward of the root leaves it unsharded: FSDP2 keeps it so)
    out["sharded_at_calls"] = isinstance(sharded, DTensor)
    # Outside FSDP's forward, flat_param is the sharded DTensor: every rank reads it alike.
    out["outside_out"] = _attempt(lambda: r.module(x).detach())
    out["outside_state"] = _attempt(state)
    out["full_passed"] = _attempt(lambda: r(x, flat_param=sharded.full_tensor()).detach())
    # Last: the failing call leaves FSDP mid-forward (its pre-forward hook ran).
    out["sharded_passed"] = _attempt(lambda: r(x, flat_param=sharded).detach())
    return out


def _cnn() -> tuple[ReparamModule, Tensor, Tensor]:
    """A residual-free CNN with BatchNorm in eval mode: batched by its traced graph, in chunks
    of 2 members (the same on every rank), with its 5 members' vectors and an input."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 2),
    )  # fmt: skip
    r = ReparamModule(net.double()).eval()
    thetas = r.fresh_flat_param(5)
    return r, thetas, torch.randn(6, 1, 4, 4, dtype=torch.float64)


def _population(rank: int) -> dict[str, Any]:
    cnn, cnn_thetas, images = _cnn()
    cnn.population_strategy = "batched"
    cnn.population_chunk_size = 2
    x, y = _data()
    r = ReparamModule(_model())
    thetas = _thetas(5, r.param_numel)  # 5 rows on 2 ranks: 3 and 2
    losses = _member_losses(r, x, y)
    seen: list[Tensor] = []

    def recorded(block: Tensor) -> Tensor:
        seen.append(block.clone())
        return losses(block)

    def fails_on_rank_1(block: Tensor) -> Tensor:
        if rank == 1:
            raise ValueError("boom on rank 1")
        return losses(block)

    with torch.no_grad():
        return {
            "losses": evaluate_population(recorded, thetas),
            "seen": torch.cat(seen),
            "outputs": evaluate_population(lambda t: r(x, flat_param=t), thetas),  # (5, 8, 3)
            "labels": evaluate_population(lambda t: r(x, flat_param=t).argmax(-1), thetas),
            "one": evaluate_population(losses, thetas[:1]),  # rank 1 has no row
            "cnn": evaluate_population(lambda t: cnn(images, flat_param=t), cnn_thetas),
            "grouped": evaluate_population(losses, thetas, group=dist.new_group([0, 1])),
            "failing": _attempt(lambda: evaluate_population(fails_on_rank_1, thetas)),
            "mismatch": _attempt(lambda: evaluate_population(losses, thetas[: 5 - rank])),
        }


def _page_scripts(rank: int) -> dict[str, Any]:
    """The docs page's torchrun scripts, in this process group (their own init and destroy
    calls skipped): what each printed, or its traceback."""
    page = next(p for p in PAGES if p.exists())
    text = page.read_text()
    ran: dict[str, Any] = {}
    init, destroy = dist.init_process_group, dist.destroy_process_group
    dist.init_process_group = lambda *args, **kwargs: None
    dist.destroy_process_group = lambda *args, **kwargs: None
    try:
        for block in TORCHRUN_BLOCK.finditer(text):
            line = text.count("\n", 0, block.start("body")) + 1
            code = compile("\n" * (line - 1) + block["body"], str(page), "exec")  # page's lines
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    exec(code, {"__name__": "__main__"})
                ran[f"{page.name}:{line}"] = {"printed": printed.getvalue()}
            except Exception:
                ran[f"{page.name}:{line}"] = {"error": traceback.format_exc()}
    finally:
        dist.init_process_group, dist.destroy_process_group = init, destroy
    return {"scripts": ran}


SCENARIOS: dict[str, Callable[[int], dict[str, Any]]] = {
    "ddp": _ddp,
    "fsdp2": _fsdp2,
    "population": _population,
    "page": _page_scripts,
}


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One spawned process: every scenario, its results saved after each (partial on a hang)."""
    warnings.simplefilter("ignore")  # quiet (warnings are errors only in the parent)
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's own connections: loopback
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=COLLECTIVE_LIMIT)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=WORLD, timeout=COLLECTIVE_LIMIT
    )
    results: dict[str, Any] = {}
    path = Path(out_dir) / f"rank{rank}.pt"
    try:
        for name, scenario in SCENARIOS.items():
            start = time.perf_counter()
            try:
                results[name] = scenario(rank)
            except Exception:
                results[name] = {"crashed": traceback.format_exc()}
            results[name]["seconds"] = time.perf_counter() - start
            torch.save(results, path)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """The two processes' results, ``{rank: {scenario: results}}``."""
    out_dir = tmp_path_factory.mktemp("distributed")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(rank, store.port, str(out_dir)), daemon=True)
        for rank in range(WORLD)
    ]
    start = time.monotonic()
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(max(0.0, RUN_LIMIT - (time.monotonic() - start)))
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
    results = {
        rank: torch.load(out_dir / f"rank{rank}.pt")
        if (out_dir / f"rank{rank}.pt").exists()
        else {}
        for rank in range(WORLD)
    }
    codes = [proc.exitcode for proc in procs]
    partial = {rank: list(got) for rank, got in results.items()}
    assert not hung, f"still running after {RUN_LIMIT} s: ranks {hung}; partial results {partial}"
    assert codes == [0] * WORLD, f"exit codes {codes}; partial results {partial}"
    return results


def _scenario(spawned: dict[int, dict[str, Any]], name: str, rank: int) -> dict[str, Any]:
    got = spawned[rank][name]
    assert "crashed" not in got, f"rank {rank}, scenario {name!r}:\n{got['crashed']}"
    return got


def _value(attempt: dict[str, Any], what: str) -> Any:
    assert "error" not in attempt, f"{what} raised {attempt['error'][0]}: {attempt['error'][1]}"
    return attempt["value"]


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    """The reference: a plain (unwrapped) module trained on the full batch in this process."""
    net = _model()
    x, y = _data()
    opt = _optimizer(net.parameters())
    trajectory = []
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        trajectory.append(nn.utils.parameters_to_vector(net.parameters()).detach().clone())
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return {"trajectory": torch.stack(trajectory), "out": net(x).detach(), "state": state}


# ---- DDP ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", range(WORLD))
def test_ddp_two_processes_match_one_step_for_step(
    spawned: dict[int, dict[str, Any]], one_process: dict[str, Any], rank: int
) -> None:
    got = _scenario(spawned, "ddp", rank)
    assert got["parameters"] == ["module.flat_param"]  # one parameter ...
    if got["buckets"] is not None:  # ... so one gradient bucket: one all-reduce per step
        assert got["buckets"] == [one_process["trajectory"].shape[1]]
    torch.testing.assert_close(got["trajectory"], one_process["trajectory"], **EXACT)
    torch.testing.assert_close(got["module_out"], one_process["out"], **EXACT)


@pytest.mark.parametrize("rank", range(WORLD))
def test_ddp_maml_meta_gradient_is_averaged_over_the_ranks_tasks(
    spawned: dict[int, dict[str, Any]], rank: int
) -> None:
    got = _scenario(spawned, "ddp", rank)["maml"]
    x, y = _data()
    tasks = [
        (
            x[i * BATCH // WORLD : (i + 1) * BATCH // WORLD],
            y[i * BATCH // WORLD : (i + 1) * BATCH // WORLD],
        )
        for i in range(WORLD)
    ]
    expected = _maml(lambda r: r, tasks)  # one process, a meta-batch of both ranks' tasks
    torch.testing.assert_close(got, expected, **EXACT)


# ---- FSDP2 --------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", range(WORLD))
def test_fsdp2_two_processes_match_one_step_for_step(
    spawned: dict[int, dict[str, Any]], one_process: dict[str, Any], rank: int
) -> None:
    got = _scenario(spawned, "fsdp2", rank)
    assert got["sharded"]  # each rank holds half of flat_param
    assert got["still_sharded"]
    assert got["sharded_at_calls"]
    torch.testing.assert_close(got["trajectory"], one_process["trajectory"], **EXACT)


@pytest.mark.parametrize("rank", range(WORLD))
def test_fsdp2_after_unshard_the_unwrapped_module_sees_the_trained_weights(
    spawned: dict[int, dict[str, Any]], one_process: dict[str, Any], rank: int
) -> None:
    got = _scenario(spawned, "fsdp2", rank)
    out = _value(got["unsharded_out"], "r.module(x) after r.unshard()")
    torch.testing.assert_close(out, one_process["out"], **EXACT)
    state = _value(got["unsharded_state"], "r.module.state_dict() after r.unshard()")
    torch.testing.assert_close(state["values"], one_process["state"], **EXACT)
    assert state["types"] == {"Tensor"}
    full = _value(got["full_passed"], "r(x, flat_param=r.flat_param.full_tensor())")
    torch.testing.assert_close(full, one_process["out"], **EXACT)


@pytest.mark.parametrize("rank", range(WORLD))
def test_fsdp2_outside_forward_the_unwrapped_module_sees_the_trained_weights(
    spawned: dict[int, dict[str, Any]], one_process: dict[str, Any], rank: int
) -> None:
    got = _scenario(spawned, "fsdp2", rank)
    state = _value(got["outside_state"], "r.module.state_dict()")
    torch.testing.assert_close(state["values"], one_process["state"], **EXACT)
    assert state["types"] == {"Tensor"}, f"the unwrapped module's state dict holds {state['types']}"
    out = _value(got["outside_out"], "r.module(x)")
    torch.testing.assert_close(out, one_process["out"], **EXACT)


@pytest.mark.parametrize("rank", range(WORLD))
def test_fsdp2_the_sharded_flat_param_passed_back_in_is_refused_clearly(
    spawned: dict[int, dict[str, Any]], rank: int
) -> None:
    got = _scenario(spawned, "fsdp2", rank)["sharded_passed"]
    assert "error" in got, "r(x, flat_param=<sharded DTensor>) returned a value"
    kind, message = got["error"]
    assert kind == "TypeError", message
    assert "DTensor" in message, message
    assert "full_tensor()" in message, message


# ---- a population across ranks ------------------------------------------------------------
@pytest.mark.parametrize("rank", range(WORLD))
def test_evaluate_population_on_two_ranks_equals_the_loop_of_single_calls(
    spawned: dict[int, dict[str, Any]], rank: int
) -> None:
    got = _scenario(spawned, "population", rank)
    x, y = _data()
    r = ReparamModule(_model())
    thetas = _thetas(5, r.param_numel)
    with torch.no_grad():
        outputs = torch.stack([r(x, flat_param=theta) for theta in thetas])
        losses = torch.stack([F.cross_entropy(out, y) for out in outputs])
    mine = slice(0, 3) if rank == 0 else slice(3, 5)  # contiguous; the first rank takes more
    torch.testing.assert_close(got["seen"], thetas[mine], rtol=0, atol=0)
    torch.testing.assert_close(got["losses"], losses, **EXACT)
    torch.testing.assert_close(got["outputs"], outputs, **EXACT)
    assert torch.equal(got["labels"], outputs.argmax(-1))  # int64 rows travel too
    torch.testing.assert_close(got["one"], losses[:1], **EXACT)
    torch.testing.assert_close(got["grouped"], losses, **EXACT)
    cnn, cnn_thetas, images = _cnn()  # batched in chunks on each rank, gathered in order
    with torch.no_grad():
        expected = torch.stack([cnn(images, flat_param=theta) for theta in cnn_thetas])
    torch.testing.assert_close(got["cnn"], expected)


@pytest.mark.parametrize("rank", range(WORLD))
def test_evaluate_population_fails_on_every_rank_alike(
    spawned: dict[int, dict[str, Any]], rank: int
) -> None:
    got = _scenario(spawned, "population", rank)
    kind, message = got["failing"]["error"]  # no rank is left waiting in a collective
    if rank == 1:
        assert (kind, message) == ("ValueError", "boom on rank 1")  # its own error, as is
    else:
        assert kind == "RuntimeError", message
        assert "fn failed on rank(s) [1]" in message, message
    kind, message = got["mismatch"]["error"]
    assert kind == "ValueError", message
    assert "same shape on every rank" in message, message
    assert "(4, 66), (5, 66)" in message, message


# ---- evaluate_population in one process ---------------------------------------------------
def test_evaluate_population_without_a_process_group_is_the_checked_call() -> None:
    assert not dist.is_initialized()
    r = ReparamModule(_model())
    x, y = _data()
    thetas = _thetas(4, r.param_numel)
    fn = _member_losses(r, x, y)
    with torch.no_grad():
        torch.testing.assert_close(evaluate_population(fn, thetas), fn(thetas), **EXACT)


@pytest.mark.parametrize(
    ("fn", "thetas", "error", "match"),
    [
        (None, torch.zeros(2, 3), TypeError, "fn must be callable, got NoneType"),
        (torch.sum, [[0.0] * 3] * 2, TypeError, "thetas must be a torch.Tensor, got list"),
        (torch.sum, torch.zeros(3), ValueError, r"\(population, num_params\) .* got \(3,\)"),
        (torch.sum, torch.zeros(0, 3), ValueError, r"population >= 1, got \(0, 3\)"),
        (lambda t: t.tolist(), torch.zeros(2, 3), TypeError, "fn must return a tensor .* got list"),
        (torch.sum, torch.zeros(2, 3), ValueError, r"given 2 rows and returned shape \(\)"),
        (lambda t: t[:1], torch.zeros(2, 3), ValueError, r"returned shape \(1, 3\).*\(2, \.\.\.\)"),
    ],
)
def test_evaluate_population_refuses_bad_arguments_clearly(
    fn: Any, thetas: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        evaluate_population(fn, thetas)


# ---- nn.DataParallel ----------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.device_count() > 0, reason="what DataParallel does without GPUs")
def test_data_parallel_without_gpus_calls_the_wrapper_as_is() -> None:
    r = ReparamModule(_model())
    x, _ = _data()
    dp = nn.DataParallel(r)
    assert dp.device_ids == []
    torch.testing.assert_close(dp(x), r(x), rtol=0, atol=0)
    theta = _thetas(1, r.param_numel)[0]
    # The original's users pass theta expanded to [ngpu, N] so that DataParallel's scatter hands
    # each replica one (1, N) row. With no GPU nothing is scattered: here it is a population of
    # two members, hence a leading dimension of 2.
    out = dp(x, flat_param=theta.expand(2, -1))
    assert out.shape == (2, BATCH, 3)
    torch.testing.assert_close(out[1], r(x, flat_param=theta), **EXACT)


# (with devices, replicas and (1, N) rows: tests/test_data_parallel.py)


# ---- the docs page's scripts --------------------------------------------------------------
def test_the_pages_torchrun_scripts_run_on_two_ranks(spawned: dict[int, dict[str, Any]]) -> None:
    scripts = [_scenario(spawned, "page", rank)["scripts"] for rank in range(WORLD)]
    assert len(scripts[0]) >= 4, f"torchrun scripts found in {PAGES}: {list(scripts[0])}"
    for where, got in scripts[0].items():
        for rank in range(WORLD):
            assert "error" not in scripts[rank][where], (
                f"{where}, rank {rank}:\n{scripts[rank][where]['error']}"
            )
        printed = got["printed"]
        assert printed, where
        assert "False" not in printed, f"{where}: {printed}"  # every check printed True
        assert scripts[1][where]["printed"] == printed, where  # the same on both ranks
