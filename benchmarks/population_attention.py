"""Populations of a small transformer block: the graph plan against vmap, the loop and by hand.

The block of the populations issue: pre-norm, ``nn.MultiheadAttention`` (2 heads, width 32),
residuals and an MLP (width 128), on a shared batch of 4 sequences of 16 tokens; 64 members.
Two tables: no grad, and forward+backward to the ``(P, N)`` vectors (training). The baseline is
the loop of single calls; beside it our population call under each strategy, ``torch.func.vmap``
over ``functional_call`` with ``stack_module_state`` (torch's recipe for ensembles), and the
same block written by hand for all members at once (``baddbmm`` per projection, the members
and heads folded into the batch of ``bmm``): the floor a rule-per-layer plan can approach.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from torchreparam import ReparamModule, explain_population

from .context import Context
from .population_cnn import BATCHED, setup, speed_verdict
from .report import TIMING_HEADERS, Table, timing_rows

__all__ = ["Block", "hand_written", "population_attention_case"]

LOOP = "loop of single torchreparam calls"
AUTO = "torchreparam, flat_param=thetas (P, N), 'auto'"
VMAP = "torchreparam, population_strategy='vmap'"
TORCH = "torch.func: vmap over functional_call, stack_module_state"
TORCH_SLOW = f"{TORCH}, MHA fast path off"
VMAP_SLOW = f"{VMAP}, MHA fast path off"
HAND = "hand-written baddbmm/bmm, heads grouped"
WIDTH, HEADS, SEQUENCE, BATCH = 32, 2, 16, 4


class Block(nn.Module):
    """A pre-norm transformer block around ``nn.MultiheadAttention``."""

    def __init__(self, width: int = WIDTH, heads: int = HEADS) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, L, C)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def hand_written(r: ReparamModule, thetas: Tensor, x: Tensor) -> Tensor:
    """``Block`` for every member of ``thetas`` ``(P, N)`` on a shared ``x`` ``(B, L, C)``."""
    p, (b, n, c) = thetas.shape[0], x.shape
    w = r.layout.unflatten(thetas)  # name -> (P, *shape)
    d = c // HEADS

    def linear(h: Tensor, name: str) -> Tensor:  # (P, rows, in) -> (P, rows, out)
        weight, bias = w[f"{name}.weight"], w[f"{name}.bias"]
        return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))

    def norm(h: Tensor, name: str) -> Tensor:  # (P, rows, C)
        out = F.layer_norm(h, (c,))
        return torch.addcmul(w[f"{name}.bias"].unsqueeze(1), out, w[f"{name}.weight"].unsqueeze(1))

    rows = x.reshape(1, b * n, c).expand(p, -1, -1)  # (P, B*L, C)
    qkv = torch.baddbmm(
        w["attn.in_proj_bias"].unsqueeze(1),
        norm(rows, "norm1"),
        w["attn.in_proj_weight"].transpose(1, 2),
    )  # (P, B*L, 3C)
    qkv = qkv.view(p, b, n, 3, HEADS, d).permute(3, 0, 1, 4, 2, 5).reshape(3, p * b * HEADS, n, d)
    scores = torch.baddbmm(torch.zeros(()), qkv[0], qkv[1].transpose(1, 2), alpha=1 / math.sqrt(d))
    y = torch.bmm(scores.softmax(-1), qkv[2])  # (P*B*H, L, D)
    y = y.view(p, b, HEADS, n, d).transpose(2, 3).reshape(p, b * n, c)
    h = rows + linear(y, "attn.out_proj")
    h = h + linear(F.gelu(linear(norm(h, "norm2"), "mlp.0")), "mlp.2")
    return h.view(p, b, n, c)


def _contenders(
    size: int, x: Tensor, grad: bool
) -> tuple[dict[str, Callable[[], object]], ReparamModule, Tensor]:
    torch.manual_seed(0)
    net = Block().to(x.device).eval()
    r, thetas, forced, params, buffers, base = setup(net, size)
    thetas.requires_grad_(grad)

    def torch_vmap() -> Tensor:
        with warnings.catch_warnings():  # (vmap runs MHA's fast path member by member)
            warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
            return vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)

    def slow_path(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
        def call() -> Tensor:
            fast = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                return fn()
            finally:
                torch.backends.mha.set_fastpath_enabled(fast)

        return call

    def ours_vmap() -> Tensor:
        with warnings.catch_warnings():  # (as torch_vmap)
            warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
            return forced["vmap"](x, flat_param=thetas)

    calls: dict[str, Callable[[], Tensor]] = {
        LOOP: lambda: torch.stack([r(x, flat_param=t) for t in thetas]),
        AUTO: lambda: r(x, flat_param=thetas),
        BATCHED: lambda: forced["batched"](x, flat_param=thetas),
        VMAP: ours_vmap,
        VMAP_SLOW: slow_path(ours_vmap),
        TORCH: torch_vmap,
        TORCH_SLOW: slow_path(torch_vmap),
        HAND: lambda: hand_written(r, thetas, x),
    }
    if not grad:
        return dict(calls), r, thetas
    wrt = {name: [thetas] for name in calls}
    wrt[TORCH] = wrt[TORCH_SLOW] = list(params.values())

    def trained(name: str) -> Callable[[], object]:
        fn, inputs = calls[name], wrt[name]
        return lambda: torch.autograd.grad(fn().square().sum(), inputs)

    return {name: trained(name) for name in calls}, r, thetas


def _table(ctx: Context, size: int, grad: bool) -> Table:
    x = torch.randn(BATCH, SEQUENCE, WIDTH, device=ctx.device)
    contenders, r, thetas = _contenders(size, x, grad)
    with torch.set_grad_enabled(grad):
        timings, failed = ctx.measure(contenders, LOOP, ctx.scaled(0.5, 4.0, warmup=2))
        explained = explain_population(r, x, flat_param=thetas).splitlines()
    limit = 0.92 if grad else 1.2  # (training: the ratio within 1.3x, 1.2 / 1.3)
    if BATCHED in timings:
        verdict = speed_verdict(timings, limit, (VMAP, VMAP_SLOW, TORCH, TORCH_SLOW))
        hand = timings.get(HAND)
        if hand is not None:
            verdict += f"; {timings[BATCHED].median / hand.median:.2f}x the hand-written time"
    else:
        verdict = "not measured: " + failed.get(BATCHED, "?")
    what = "forward+backward to thetas" if grad else "no grad"
    return Table(
        key="population-attention",
        title=(
            f"Population of {size} transformer blocks ({HEADS} heads, width {WIDTH}, sequence "
            f"{SEQUENCE}, batch {BATCH}), {what}"
        ),
        target=(
            f"'batched' speed-up over the loop at least {limit:.2g}x (1.2x within 1.3x) and "
            "faster than vmap"
            if grad
            else "'batched' at least 1.2x faster than the loop and faster than vmap"
        ),
        verdict=verdict,
        headers=TIMING_HEADERS,
        rows=timing_rows(timings, failed),
        notes=[
            "paired ratio below 1: faster than the loop (speed-up = 1 / ratio)",
            *(line for line in explained if line.startswith(("batched plan", "auto:"))),
        ],
    )


def population_attention_case(ctx: Context) -> list[Table]:
    """64 members (8 in smoke mode), without and with gradients."""
    size = 8 if ctx.smoke else 64
    return [_table(ctx, size, grad=False), _table(ctx, size, grad=True)]
