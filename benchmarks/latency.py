"""Latency-bound cases on the MLP: forward, forward+backward, overhead per parameter tensor."""

from __future__ import annotations

import torch

from .context import Context
from .models import deep_linear, mlp
from .peers import (
    FUNC_FLAT,
    ORIGINAL,
    OURS,
    PLAIN,
    Contenders,
    Peers,
    backward_contenders,
    forward_contenders,
)
from .report import TIMING_HEADERS, Table, at_most, timing_rows
from .timing import median_difference, slope

__all__ = ["backward_case", "forward_case", "per_tensor_case"]


def forward_case(ctx: Context) -> list[Table]:
    """Forward with another flat vector vs the plain module's forward (no grad)."""
    model = ctx.on_device(mlp())
    p = Peers(model)
    with torch.no_grad():
        timings, failed = ctx.measure(forward_contenders(p), PLAIN)
    table = Table(
        key="forward",
        title=f"Forward with another flat vector, {model.name}, batch 32, no grad",
        target="at most 1.3x the plain forward (original 2.6x, functional_call from a flat "
        "vector 2.9x, higher 3.5x)",
        verdict=at_most("torchreparam", timings[OURS].ratio, 1.3),
        headers=TIMING_HEADERS,
        rows=timing_rows(timings, failed),
        notes=["baseline: the plain module called with its own weights, under torch.no_grad()"],
    )
    return [table]


def backward_case(ctx: Context) -> list[Table]:
    """Forward, cross-entropy and the gradient to the flat vector vs plain to its parameters."""
    model = ctx.on_device(mlp())
    p = Peers(model)
    timings, failed = ctx.measure(backward_contenders(p), PLAIN)
    table = Table(
        key="backward",
        title=f"Forward+backward to the flat vector, {model.name}, batch 32",
        target="at most 1.2x plain forward+backward to its own parameters (original 1.6x, "
        "functional_call 1.75x)",
        verdict=at_most("torchreparam", timings[OURS].ratio, 1.2),
        headers=TIMING_HEADERS,
        rows=timing_rows(timings, failed),
        notes=[
            "each call: forward, cross-entropy, torch.autograd.grad to theta (the plain module: "
            "to its own parameter tensors)",
            "vector_to_parameters copies theta into the module, then parameters_to_vector "
            "gathers the gradients",
        ],
    )
    return [table]


_PER_TENSOR = (PLAIN, OURS, ORIGINAL, FUNC_FLAT)
_MODES = ("no grad", "forward, grad enabled", "forward+backward")
_LIMITS = {"no grad": (1.0, 4.2), "forward, grad enabled": (1.5, 6.1)}  # (target, original)


def _mode_contenders(p: Peers, mode: str) -> Contenders:
    if mode == "forward+backward":
        every = backward_contenders(p)
    else:
        if mode == "forward, grad enabled":
            p.theta.requires_grad_()
        every = forward_contenders(p)
    return {n: every[n] for n in _PER_TENSOR}


def _extra_times(ctx: Context, tensors: int, mode: str) -> dict[str, float]:
    """Median paired extra seconds per call over the plain module, per contender; for the
    plain module itself, its own median seconds per call."""
    p = Peers(ctx.on_device(deep_linear(tensors)))
    with torch.set_grad_enabled(mode != "no grad"):
        budget = ctx.scaled(rounds=2.0, block=0.5)  # small differences: more rounds
        timings, _ = ctx.measure(_mode_contenders(p, mode), PLAIN, budget)
    base = timings[PLAIN].times
    extras = {n: median_difference(t.times, base) for n, t in timings.items() if n != PLAIN}
    return {PLAIN: timings[PLAIN].median, **extras}


def _per_tensor_table(ctx: Context, mode: str, counts: tuple[int, ...]) -> Table:
    extras = {n: _extra_times(ctx, n, mode) for n in counts}
    slopes = {name: slope(counts, [extras[n][name] for n in counts]) * 1e6 for name in _PER_TENSOR}
    rows: list[tuple[str, ...]] = []
    for name in _PER_TENSOR:
        cells = (f"{extras[n][name] * 1e6:.1f} µs" for n in counts)
        share = f"{slopes[name] / slopes[PLAIN]:.2f}"
        label = "plain module: its own time, not extra" if name == PLAIN else name
        rows.append((label, *cells, f"{slopes[name]:.2f} µs", share))
    limit, original = _LIMITS.get(mode, (None, None))
    return Table(
        key="per-tensor",
        title=f"Overhead per parameter tensor, {mode}",
        target=f"at most {limit:g} µs per tensor (original {original} µs)" if limit else "",
        verdict=at_most("torchreparam", slopes[OURS], limit, " µs") if limit else "",
        headers=(
            "contender",
            *(f"extra at {n} tensors" for n in counts),
            "slope per tensor",
            "slope / plain's",
        ),
        rows=rows,
        notes=[
            "extra = median over rounds of (contender - plain module) on the same model, "
            "Sequential of Linear(4, 4) layers, batch 4; slope by least squares over "
            f"{', '.join(map(str, counts))} tensors",
            "first row: the plain module's own time per call and its own cost per tensor. "
            "Microseconds grow with the machine's load; the last column (a share of the plain "
            "module's own cost per tensor) much less",
        ],
    )


def per_tensor_case(ctx: Context) -> list[Table]:
    """Slope of extra time against the number of parameter tensors (tiny Linear stacks)."""
    counts = (8, 32) if ctx.smoke else (8, 32, 128)
    tables = [_per_tensor_table(ctx, mode, counts) for mode in _MODES]
    tables[-1].notes.append(
        "forward+backward: no target; the plain module's autograd.grad to many leaf tensors "
        "has its own cost per tensor, which one flat gradient avoids"
    )
    return tables
