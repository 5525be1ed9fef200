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

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from torchreparam import ReparamModule, explain_population

from .context import Context
from .report import TIMING_HEADERS, Table, at_most, timing_rows

__all__ = ["population_cnn_case"]

LOOP = "loop of single torchreparam calls"
AUTO = "torchreparam, flat_param=thetas (P, N), 'auto'"
HAND = "hand-written grouped convolutions + baddbmm"


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


def _table(ctx: Context, name: str, make: type[nn.Module] | object, size: int) -> Table:
    torch.manual_seed(0)
    net = make().to(ctx.device).eval()  # type: ignore[operator]
    x = torch.randn(25, 1, 8, 8, device=ctx.device)
    members = [copy.deepcopy(net) for _ in range(size)]
    r = ReparamModule(net)
    thetas = r.fresh_flat_param(size)  # (P, N)
    forced = {}
    for strategy in ("batched", "vmap"):
        forced[strategy] = ReparamModule(copy.deepcopy(members[0])).eval()
        forced[strategy].population_strategy = strategy
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")

    def torch_vmap() -> Tensor:
        return vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)

    contenders = {
        LOOP: lambda: torch.stack([r(x, flat_param=t) for t in thetas]),
        AUTO: lambda: r(x, flat_param=thetas),
        "torchreparam, population_strategy='batched'": lambda: forced["batched"](
            x, flat_param=thetas
        ),
        "torchreparam, population_strategy='vmap'": lambda: forced["vmap"](x, flat_param=thetas),
        "torch.func: vmap over functional_call, stack_module_state": torch_vmap,
    }
    if name == "CNN":
        contenders[HAND] = lambda: _hand(r, thetas, x)
    with torch.no_grad():
        timings, failed = ctx.measure(contenders, LOOP, ctx.scaled(0.5, 4.0, warmup=1))
        chose = explain_population(r, x, flat_param=thetas).splitlines()
    batched = timings.get("torchreparam, population_strategy='batched'")
    hand = timings.get(HAND)
    if batched is None:
        verdict = "not measured: " + failed.get("torchreparam, population_strategy='batched'", "?")
    elif hand is not None:
        verdict = at_most("'batched' against the hand-written", batched.ratio / hand.ratio, 1.15)
    else:
        verdict = "information"
    return Table(
        key="population-cnn",
        title=f"Population of {size} digits-sized {name}s (batch 25, 8x8), no grad",
        target="'batched' at most 1.15x the hand-written grouped convolutions" if hand else "",
        verdict=verdict,
        headers=TIMING_HEADERS,
        rows=timing_rows(timings, failed),
        notes=["paired ratio below 1: faster than the loop", *chose[2:4]],
    )


def population_cnn_case(ctx: Context) -> list[Table]:
    """64 members (8 in smoke mode) of the plain and the residual CNN."""
    size = 8 if ctx.smoke else 64
    return [_table(ctx, "CNN", _cnn, size), _table(ctx, "residual CNN", _resnet, size)]
