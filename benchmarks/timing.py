"""Timing contenders side by side: warm-up, interleaved rounds, medians, paired ratios.

Every contender is a zero-argument callable. Within a round each one runs a block of calls
(enough to last ``block_s``), in round-robin order that rotates from round to round, so slow
drifts of a shared, noisy machine hit every contender alike. A contender's figure is the median
over rounds of its time per call; its ratio is the median over rounds of its time divided by the
baseline's time in the same round (a paired ratio).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["Budget", "Timing", "compare", "median_difference", "median_ratio", "slope", "threads"]


@dataclass(frozen=True)
class Budget:
    """How long to measure: ``rounds`` rounds, blocks of about ``block_s`` seconds each."""

    rounds: int
    block_s: float
    warmup: int = 3


@dataclass(frozen=True)
class Timing:
    """One contender's result: seconds per call in each round, and the paired ratio."""

    name: str
    times: tuple[float, ...]  # seconds per call, one per round
    ratio: float  # median over rounds of times[i] / baseline.times[i]
    calls: int  # calls per block

    @property
    def median(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.times)


@contextmanager
def threads(count: int) -> Iterator[None]:
    """Within the block, torch uses ``count`` intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _noop() -> None:
    return None


def _block(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    """Seconds per call of ``calls`` calls of ``fn`` (garbage collector off, as timeit)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        return (time.perf_counter() - start) / calls
    finally:
        if enabled:
            gc.enable()


def _calls_per_block(fn: Callable[[], object], block_s: float, sync: Callable[[], None]) -> int:
    one = _block(fn, 1, sync)
    if one < block_s:  # cheap enough to look again, past one-off costs
        one = min(one, _block(fn, 1, sync), _block(fn, 1, sync))
    return max(1, min(100_000, math.ceil(block_s / max(one, 1e-9))))


def compare(
    contenders: Mapping[str, Callable[[], object]],
    baseline: str,
    budget: Budget,
    sync: Callable[[], None] = _noop,
) -> dict[str, Timing]:
    """Time ``contenders`` in interleaved rounds; ratios are paired against ``baseline``.

    Args:
        contenders: name -> zero-argument callable; ``baseline`` must be one of them.
        baseline: the name the ratios divide by.
        budget: rounds, seconds per block, warm-up calls.
        sync: called at the end of each block (``torch.cuda.synchronize`` on a GPU).

    Returns:
        name -> :class:`Timing`, in the order of ``contenders``.
    """
    if baseline not in contenders:
        raise ValueError(f"baseline {baseline!r} is not one of {sorted(contenders)}")
    names = list(contenders)
    for _ in range(budget.warmup):
        for name in names:
            contenders[name]()
    calls = {n: _calls_per_block(contenders[n], budget.block_s, sync) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(budget.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_block(contenders[name], calls[name], sync))
        gc.collect()
    base = times[baseline]
    return {n: Timing(n, tuple(times[n]), median_ratio(times[n], base), calls[n]) for n in names}


def median_ratio(times: Sequence[float], base: Sequence[float]) -> float:
    """Median over rounds of ``times[i] / base[i]``."""
    return statistics.median(t / b for t, b in zip(times, base, strict=True))


def median_difference(times: Sequence[float], base: Sequence[float]) -> float:
    """Median over rounds of ``times[i] - base[i]``."""
    return statistics.median(t - b for t, b in zip(times, base, strict=True))


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    den = sum((x - mx) ** 2 for x in xs)
    return num / den
