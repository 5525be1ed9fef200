"""Populations: one call with 64 flat vectors against a loop of single calls (no grad)."""

from __future__ import annotations

import statistics

import torch
from torch import Tensor
from torch.func import functional_call, vmap

from torchreparam import ReparamModule, explain_population

from .context import Context
from .models import Model, conv4, mlp
from .peers import Contenders, Peers
from .report import TIMING_HEADERS, Table, at_least, at_most, timing_rows
from .timing import Timing

__all__ = ["population_case"]

LOOP = "loop of single torchreparam calls"
OURS_POP = "torchreparam, flat_param=thetas (P, N)"
OURS_VMAP = "torchreparam, flat_param=thetas, population_strategy='vmap'"
OURS_BATCHED = "torchreparam, flat_param=thetas, population_strategy='batched'"


def population_contenders(p: Peers, thetas: Tensor) -> Contenders:
    """The loop (the baseline), our population call, and ``vmap`` over each peer."""
    x = p.model.inputs

    def loop() -> Tensor:
        return torch.stack([p.ours(*x, flat_param=t) for t in thetas])

    def loop_original() -> Tensor:
        return torch.stack([p.original(*x, flat_param=t) for t in thetas])

    forced = ReparamModule(p.copy())
    forced.population_strategy = "vmap"
    written = ReparamModule(p.copy())
    written.population_strategy = "batched"
    batched = {OURS_BATCHED: lambda: written(*x, flat_param=thetas)}
    try:
        with torch.no_grad():
            written(*x, flat_param=thetas[:1])
    except ValueError:  # not a Sequential MLP: the strategy refuses it
        batched = {}
    return {
        LOOP: loop,
        OURS_POP: lambda: p.ours(*x, flat_param=thetas),
        OURS_VMAP: lambda: forced(*x, flat_param=thetas),
        **batched,
        "vmap over torchreparam single calls": lambda: vmap(lambda t: p.ours(*x, flat_param=t))(
            thetas
        ),
        "vmap over functional_call, dict from the flat vector": lambda: vmap(
            lambda t: functional_call(p.func_net, p.dict_from(t), x)
        )(thetas),
        "vmap over the original torchreparam": lambda: vmap(lambda t: p.original(*x, flat_param=t))(
            thetas
        ),
        "loop of single original torchreparam calls": loop_original,
    }


def _table(ctx: Context, model: Model, size: int, speedup: float | None) -> Table:
    p = Peers(ctx.on_device(model))
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(size, p.theta.numel(), generator=gen).to(p.theta)
    thetas = p.theta + 0.01 * noise  # (P, N)
    contenders = population_contenders(p, thetas)
    with torch.no_grad():
        timings, failed = ctx.measure(contenders, LOOP, ctx.scaled(0.5, 4.0, warmup=1))
    ours = timings.get(OURS_POP)
    if ours is None:
        verdict = f"not measured: our population call {failed[OURS_POP]}"
    elif speedup is not None:
        verdict = at_least("torchreparam speed-up over the loop", 1 / ours.ratio, speedup)
    else:
        verdict = _never_slower(ours, timings[LOOP])
    target = (
        f"at least {speedup:g}x faster than a loop of single calls"
        if speedup
        else "never slower than the loop (ratio at most 1x)"
    )
    return Table(
        key="population",
        title=f"Population of {size} flat vectors, {model.name}, no grad",
        target=target,
        verdict=verdict,
        headers=TIMING_HEADERS,
        rows=timing_rows(timings, failed),
        notes=[
            "paired ratio below 1: faster than the loop (speed-up = 1 / ratio)",
            f"population_strategy='auto' (the default): {_plan(p, thetas)}; it times the "
            "batched plan, vmap and the loop once, on the first call of each signature, and "
            "keeps the fastest",
        ],
    )


def _never_slower(ours: Timing, loop: Timing) -> str:
    """At most 1x, or within the noise: the middle half of the per-round ratios reaches 1 (a
    median over 1 by less than the rounds' own spread is not a measurable slowdown)."""
    verdict = at_most("torchreparam", ours.ratio, 1.0)
    if ours.ratio <= 1.0 or len(ours.times) < 4:
        return verdict
    ratios = [o / b for o, b in zip(ours.times, loop.times, strict=True)]
    low, _, high = statistics.quantiles(ratios, n=4)
    spread = f"the middle half of the per-round ratios spans {low:.2f}-{high:.2f}x"
    if low <= 1.0:
        return f"met within noise: torchreparam {ours.ratio:.2f}x, target <= 1x; {spread}"
    return f"{verdict}; {spread}"


def _plan(p: Peers, thetas: Tensor) -> str:
    """What ``auto`` chose for this call, in its own words (``explain_population``: nothing
    runs; a counting hook would itself turn the batched plan off)."""
    text = explain_population(p.ours, *p.model.inputs, flat_param=thetas)
    line = next((x for x in text.splitlines() if x.startswith("auto:")), "auto: unknown")
    return line.removeprefix("auto: ")


def population_case(ctx: Context) -> list[Table]:
    """64 vectors on the MLP (target: 13x the loop) and the conv net (never slower)."""
    size = 8 if ctx.smoke else 64
    conv = conv4(batch=5)  # 5-way 1-shot
    return [_table(ctx, mlp(), size, 13.0), _table(ctx, conv, size, None)]
