"""Populations of CNNs: the graph plan against hand-written grouped convolutions and vmap.

Two digits-sized models (8x8 inputs, batch 25), 64 members, no grad: a plain CNN (two 3x3
convolutions of 16 channels and a linear head) and a residual CNN in eval mode (convolution,
BatchNorm, skip connection). The baseline is the loop of single calls; beside it our population
call under each strategy, the same computation written by hand (one grouped convolution per
layer, one batched matrix product; the plain CNN only), and ``torch.func.vmap`` over
``functional_call`` with ``stack_module_state``, as torch's documentation writes ensembles.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from torchreparam import ReparamModule, explain_population

from .context import Context, make_context
from .report import TIMING_HEADERS, Table, at_most, timing_rows
from .subprocess_run import TUNED_MALLOC, run_worker, tables_from_json, tables_to_json
from .timing import Timing, threads

__all__ = ["BATCHED", "Setup", "main", "population_cnn_case", "setup", "speed_verdict"]

LOOP = "loop of single torchreparam calls"
AUTO = "torchreparam, flat_param=thetas (P, N), 'auto'"
HAND = "hand-written grouped convolutions + baddbmm"
BATCHED = "torchreparam, population_strategy='batched'"
VMAP = "torchreparam, population_strategy='vmap'"
TORCH = "torch.func: vmap over functional_call, stack_module_state"


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    )  # fmt: skip


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.bn(self.conv(x)))


def _resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), _Residual(), _Residual(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


def _hand(r: ReparamModule, thetas: Tensor, x: Tensor) -> Tensor:
    """The plain CNN for every member, written by hand."""
    p, batch = thetas.shape[0], x.shape[0]
    w1, b1, w2, b2, w3, b3 = r.layout.unflatten(thetas).values()
    h = F.conv2d(x, w1.reshape(p * 16, 1, 3, 3), b1.reshape(-1), padding=1).relu()
    h = F.conv2d(h, w2.reshape(p * 16, 16, 3, 3), b2.reshape(-1), padding=1, groups=p).relu()
    h = h.view(batch, p, -1).transpose(0, 1)  # (P, B, 16*8*8)
    return torch.baddbmm(b3.unsqueeze(1), h, w3.transpose(1, 2))


def speed_verdict(timings: Mapping[str, Timing], speedup: float, vmaps: Sequence[str]) -> str:
    """'batched' at least ``speedup`` x faster than the loop and faster than the fastest of
    ``vmaps`` (both, or missed)."""
    batched = timings[BATCHED]
    found = [timings[n] for n in vmaps if n in timings]
    if not found:
        return "not measured: no vmap contender ran"
    best = min(found, key=lambda t: t.median)
    faster = best.median / batched.median
    text = (
        f"'batched' speed-up over the loop {1 / batched.ratio:.2f}x (target >= {speedup:g}x), "
        f"{faster:.2f}x the speed of the fastest vmap ({best.name}; target > 1x)"
    )
    return ("met: " if 1 / batched.ratio >= speedup and faster > 1 else "missed: ") + text


class Setup(NamedTuple):
    """What every population table starts from: a model's wrapper (``r``), ``size`` members'
    vectors, a wrapper per forced strategy, and torch.func's state stacked over ``size`` copies
    of the model, with a meta-device copy to call."""

    r: ReparamModule
    thetas: Tensor
    forced: dict[str, ReparamModule]
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    base: nn.Module


def setup(net: nn.Module, size: int) -> Setup:
    members = [copy.deepcopy(net) for _ in range(size)]
    r = ReparamModule(net)
    thetas = r.fresh_flat_param(size)  # (P, N)
    forced = {}
    for strategy in ("batched", "vmap"):
        forced[strategy] = ReparamModule(copy.deepcopy(members[0])).eval()
        forced[strategy].population_strategy = strategy
    params, buffers = stack_module_state(members)
    return Setup(r, thetas, forced, params, buffers, copy.deepcopy(members[0]).to("meta"))


def _table(
    ctx: Context, name: str, make: type[nn.Module] | object, size: int, allocator: str = ""
) -> Table:
    torch.manual_seed(0)
    net = make().to(ctx.device).eval()  # type: ignore[operator]
    x = torch.randn(25, 1, 8, 8, device=ctx.device)
    r, thetas, forced, params, buffers, base = setup(net, size)

    def torch_vmap() -> Tensor:
        return vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)

    contenders = {
        LOOP: lambda: torch.stack([r(x, flat_param=t) for t in thetas]),
        AUTO: lambda: r(x, flat_param=thetas),
        BATCHED: lambda: forced["batched"](x, flat_param=thetas),
        VMAP: lambda: forced["vmap"](x, flat_param=thetas),
        TORCH: torch_vmap,
    }
    if name == "CNN":
        contenders[HAND] = lambda: _hand(r, thetas, x)
    with torch.no_grad():
        timings, failed = ctx.measure(contenders, LOOP, ctx.scaled(0.5, 4.0, warmup=1))
        chose = explain_population(r, x, flat_param=thetas).splitlines()
    batched = timings.get(BATCHED)
    hand = timings.get(HAND)
    target = ""
    if batched is None:
        verdict = "not measured: " + failed.get(BATCHED, "?")
    elif hand is not None:
        verdict = at_most("'batched' against the hand-written", batched.ratio / hand.ratio, 1.15)
        target = "'batched' at most 1.15x the hand-written grouped convolutions"
    elif allocator:  # (the residual CNN's target, judged where memory is reused)
        verdict = speed_verdict(timings, 1.2, (VMAP, TORCH))
        target = "'batched' at least 1.2x faster than the loop and faster than vmap"
    else:
        verdict = "information"
    where = f", {allocator} allocator" if allocator else ""
    return Table(
        key="population-cnn",
        title=f"Population of {size} digits-sized {name}s (batch 25, 8x8), no grad{where}",
        target=target,
        verdict=verdict,
        headers=TIMING_HEADERS,
        rows=timing_rows(timings, failed),
        notes=["paired ratio below 1: faster than the loop", *chose[2:4]],
    )


def population_cnn_case(ctx: Context) -> list[Table]:
    """64 members (8 in smoke mode) of the plain and the residual CNN; the residual CNN again
    in a fresh process with glibc's thresholds raised (memory reused, no page faults)."""
    size = 8 if ctx.smoke else 64
    tables = [_table(ctx, "CNN", _cnn, size), _table(ctx, "residual CNN", _resnet, size)]
    tables[1].notes.append(
        "glibc's default allocator: each call's activations (6.5 MB per layer at 64 members) "
        "are page-faulted in afresh (about 6,000-8,000 minor faults per population call here; "
        "the loop's small tensors none); the next table reuses memory"
    )
    args = ["--smoke"] if ctx.smoke else []
    tuned = tables_from_json(run_worker("benchmarks.population_cnn", args, TUNED_MALLOC))
    tuned[0].notes.append(
        "run in a subprocess with MALLOC_MMAP_THRESHOLD_=2147483647 "
        "MALLOC_TRIM_THRESHOLD_=2147483647 (see the allocator note)"
    )
    return tables + tuned


def main(argv: Sequence[str] | None = None) -> int:
    """The residual CNN's table in this process (a worker's body): its JSON on stdout."""
    smoke = "--smoke" in (sys.argv[1:] if argv is None else argv)
    with threads(1):
        table = _table(make_context(smoke), "residual CNN", _resnet, 8 if smoke else 64, "tuned")
    print(tables_to_json([table]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
