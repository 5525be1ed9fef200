"""Long inner loops: memory against the number of inner steps K, and time, for every mode.

The net and data of issue 12: two 3x3 convolutions of 32 channels on 16x16 images, a distilled
set of 32 images (requiring grad) and a learned learning rate; the outer loss is the
cross-entropy of ``theta_K`` on 64 other images, differentiated w.r.t. the distilled images,
the learning rate and ``theta_0``. Memory: the growth of peak RSS over one outer
forward+backward, each (contender, K) in a fresh process (glibc tuned to reuse its heap, so
the peak is the live peak). Time: interleaved rounds in this process, ratios to the full unroll.

Run as a worker: ``python -m benchmarks.unroll CONTENDER K [--smoke | --medium]`` prints JSON
(``--medium``: a smaller net that tests/test_unroll.py measures in seconds).
"""

from __future__ import annotations

import copy
import json
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from torchreparam import ReparamModule, unroll

from .context import Context
from .original import OriginalReparamModule
from .report import TIMING_HEADERS, Table, at_most, timing_rows
from .subprocess_run import TUNED_MALLOC, run_worker

try:  # optional peer
    import higher
except ImportError:
    higher = None

__all__ = ["unroll_case"]

FULL, CKPT, CKPT5 = "unroll, memory='full'", "unroll, memory='checkpoint'", "checkpoint, segment=5"
TWO_LEVEL = "checkpoint, segment=10, inner_segment=1"
TRUNC, IMPLICIT = "truncated, window=10", "implicit (iMAML), prox=1"
FUNC, HIGHER, ORIGINAL = "torch.func plain unroll", "higher (full unroll)", "original torchreparam"
MODES: dict[str, dict[str, Any]] = {
    FULL: {"memory": "full"},
    CKPT: {"memory": "checkpoint"},
    CKPT5: {"memory": "checkpoint", "segment": 5},
    TWO_LEVEL: {"memory": "checkpoint", "segment": 10, "inner_segment": 1},
    TRUNC: {"memory": "truncated", "window": 10},
    IMPLICIT: {"memory": "implicit", "prox": 1.0},
}
CONTENDERS = (*MODES, FUNC, HIGHER, ORIGINAL)
# measured by tests/test_unroll.py only: one level at two-level's stride, for the comparison
EXTRA_MODES: dict[str, dict[str, Any]] = {
    "checkpoint, segment=10": {"memory": "checkpoint", "segment": 10},
}
KS, SMOKE_KS = (20, 40, 60, 100), (2, 4)
SIZES = {"full": (32, 16, 32), "medium": (16, 8, 16), "small": (4, 8, 8)}  # channels, side, images
FIGURE = (
    Path(__file__).resolve().parents[1] / "docs" / "assets" / "benchmarks" / "unroll_memory.png"
)


class Problem:
    """The distillation problem, built from a seed (``size``: one of :data:`SIZES`; ``small``
    is the smoke run's tiny version)."""

    def __init__(self, size: str = "full") -> None:
        torch.manual_seed(0)
        ch, side, n = SIZES[size]
        self.net = nn.Sequential(
            nn.Conv2d(3, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(ch * side * side, 10),
        )  # fmt: skip
        self.plain = copy.deepcopy(self.net)
        self.r = ReparamModule(copy.deepcopy(self.net))
        self.images = torch.randn(n, 3, side, side, requires_grad=True)
        self.labels = torch.arange(n) % 10
        self.real = (torch.randn(2 * n, 3, side, side), torch.randint(0, 10, (2 * n,)))
        self.lr = torch.tensor(0.01, requires_grad=True)
        self.theta0 = self.r.flat_param.detach().clone().requires_grad_()
        self.names = [n for n, _ in self.plain.named_parameters()]
        self.shapes = [p.shape for p in self.plain.parameters()]

    def outer(self, theta: Tensor) -> Tensor:
        return F.cross_entropy(self.r(self.real[0], flat_param=theta), self.real[1])

    def ours(self, k: int, mode: dict[str, Any]) -> Callable[[], object]:
        def loss(theta: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
            return F.cross_entropy(self.r(batch[0], flat_param=theta), batch[1])

        lr = self.lr.detach() if mode["memory"] == "implicit" else self.lr
        if "window" in mode:  # (the one-step warm-up)
            mode = {**mode, "window": min(k, mode["window"])}
        batches = [(self.images, self.labels)] * k
        return lambda: torch.autograd.grad(
            self.outer(unroll(loss, self.theta0, batches, lr=lr, **mode)),
            [self.images, self.theta0],
        )

    def plain_unroll(
        self, k: int, call: Callable[[Tensor, Tensor], Tensor]
    ) -> Callable[[], object]:
        """The loop users write by hand: ``call(x, theta)`` runs the model with a flat vector."""

        def run() -> object:
            theta = self.theta0
            for _ in range(k):
                loss = F.cross_entropy(call(self.images, theta), self.labels)
                (g,) = torch.autograd.grad(loss, theta, create_graph=True)
                theta = theta - self.lr * g
            out = F.cross_entropy(call(self.real[0], theta), self.real[1])
            return torch.autograd.grad(out, [self.images, self.lr, self.theta0])

        return run

    def views(self, theta: Tensor) -> dict[str, Tensor]:
        sizes = [s.numel() for s in self.shapes]
        chunks = theta.split(sizes)
        return {n: c.view(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    def contender(self, name: str, k: int) -> Callable[[], object]:
        if name in MODES or name in EXTRA_MODES:
            return self.ours(k, {**MODES, **EXTRA_MODES}[name])
        if name == FUNC:
            return self.plain_unroll(
                k, lambda x, t: functional_call(self.plain, self.views(t), (x,))
            )
        if name == ORIGINAL:
            original = OriginalReparamModule(copy.deepcopy(self.plain))
            return self.plain_unroll(k, lambda x, t: original(x, flat_param=t))
        if higher is None:
            raise RuntimeError("higher is not installed")
        fmodel = higher.monkeypatch(copy.deepcopy(self.plain), copy_initial_weights=True)
        return self.plain_unroll(k, lambda x, t: fmodel(x, params=list(self.views(t).values())))


def _peak_mb() -> float:
    """This process's peak RSS (MB). Linux's VmHWM is the peak of this program's own memory;
    ``ru_maxrss`` starts from the RSS of the process that forked it (a large pytest process
    hid every worker's growth), so it is only the fallback without /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(name: str, k: int, size: str = "full") -> float:
    """Peak RSS growth (MB) of one outer forward+backward with ``k`` inner steps."""
    problem = Problem(size)
    problem.contender(name, 1)()  # warm-up: kernels, caches, lazy imports
    run = problem.contender(name, k)
    before = _peak_mb()
    run()
    return _peak_mb() - before


def _memory_table(ctx: Context) -> Table:
    ks = SMOKE_KS if ctx.smoke else KS
    names = (FULL, CKPT) if ctx.smoke else CONTENDERS
    peaks: dict[str, list[float]] = {}
    for name in names:
        if ctx.smoke:  # the code path only, in this process (its figures mean nothing)
            peaks[name] = [worker(name, k, "small") for k in ks]
            continue
        peaks[name] = [run_worker("benchmarks.unroll", [name, str(k)], TUNED_MALLOC) for k in ks]
    growth = {n: p[-1] - p[0] for n, p in peaks.items()}
    ratio = growth[CKPT] / growth[FULL] if growth[FULL] > 0 else float("nan")
    if not ctx.smoke:
        _figure(ks, peaks)
    return Table(
        key="unroll",
        title="Long inner loops: peak memory of one outer step (MB) against K inner steps",
        target="" if ctx.smoke else "checkpoint's growth from K=20 to K=100 at most 1/10 of full's",
        verdict="" if ctx.smoke else at_most("checkpoint growth / full growth", ratio, 0.1),
        headers=("contender", *(f"K={k}" for k in ks), f"growth K={ks[0]}->{ks[-1]}"),
        rows=[(n, *(f"{v:.0f}" for v in p), f"{growth[n]:.0f}") for n, p in peaks.items()],
        notes=[
            "peak RSS of one outer forward+backward above that of a one-step warm-up, each "
            "contender and K in a fresh process (glibc's heap reused, never trimmed), one "
            "thread; net: 2 conv 3x3 x 32 "
            "channels on 16x16, 32 distilled images, SGD inner steps with a learned lr",
            "every mode and peer: ![memory against K](assets/benchmarks/unroll_memory.png)",
        ],
    )


def _figure(ks: tuple[int, ...], peaks: dict[str, list[float]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, values in peaks.items():
        ax.plot(ks, values, marker="o", label=name)
    ax.set_yscale("symlog", linthresh=10)  # (log above 10 MB; the flat modes sit near 0)
    ax.set(xlabel="inner steps K", ylabel="peak memory above a 1-step run (MB)",
           title="Memory of one outer step against K (CPU, peak RSS)")  # fmt: skip
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _time_table(ctx: Context) -> Table:
    k = 2 if ctx.smoke else 20
    problem = Problem("small" if ctx.smoke else "full")
    names = (FULL, CKPT) if ctx.smoke else CONTENDERS
    contenders = {n: problem.contender(n, k) for n in names if n != HIGHER or higher is not None}
    timings, failed = ctx.measure(contenders, FULL, ctx.scaled(0.4, 5.0, warmup=1))
    return Table(
        key="unroll",
        title=f"Long inner loops: time of one outer step, K={k}",
        target="" if ctx.smoke else "checkpoint at most 1.6x the full unroll",
        verdict="" if ctx.smoke else at_most("checkpoint", timings[CKPT].ratio, 1.6),
        headers=TIMING_HEADERS,
        rows=timing_rows(timings, failed),
        notes=["same problem as the memory table; ratios paired against memory='full'"],
    )


def unroll_case(ctx: Context) -> list[Table]:
    """Memory against K for every mode and peer, then the time at one K."""
    return [_memory_table(ctx), _time_table(ctx)]


if __name__ == "__main__":
    torch.set_num_threads(1)
    flags = {"--smoke": "small", "--medium": "medium"}
    size = next((flags[a] for a in sys.argv[1:] if a in flags), "full")
    name, k = [a for a in sys.argv[1:] if a not in flags]
    print(json.dumps(worker(name, int(k), size)))
