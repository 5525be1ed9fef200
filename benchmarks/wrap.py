"""Wrapping cost: peak extra resident memory and time, each wrap in a fresh process."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

from torch import nn

from torchreparam import ReparamModule

from .context import Context
from .original import OriginalReparamModule
from .report import Table, at_most, fmt_time
from .subprocess_run import run_worker

__all__ = ["WRAPPERS", "measure_wrap", "wrap_case"]

WRAPPERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "torchreparam": ReparamModule,
    "original torchreparam": OriginalReparamModule,
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def measure_wrap(build: Callable[[], nn.Module], wrapper: str) -> dict[str, Any]:
    """Build a model, then wrap it with ``wrapper``: peak extra RSS, time, parameter bytes."""
    model = build()
    # parameters() yields tied parameters once; no reference outlives the sum
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gc.collect()
    reset = _reset_peak()
    before = _status_kib("VmRSS") if reset else _status_kib("VmHWM")
    start = time.perf_counter()
    wrapped = WRAPPERS[wrapper](model)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    after = _status_kib("VmRSS")
    del wrapped
    return {
        "param_bytes": param_bytes,
        "peak_extra": (peak - before) * 1024,
        "after_extra": (after - before) * 1024,
        "seconds": seconds,
        "peak_reset": reset,
    }


def _worker_module(model: str) -> str:
    return "benchmarks.gpt2_worker" if model.startswith("gpt2") else "benchmarks.worker"


def _mb(n: float) -> str:
    return f"{n / 2**20:+,.0f} MiB"


def wrap_case(ctx: Context, model: str, label: str) -> list[Table]:
    """Wrap ``model`` (a worker's model name; ``label`` in the title) with each wrapper, each
    time in a fresh process, interleaved."""
    rounds = 1 if ctx.smoke else 3
    runs: dict[str, list[dict[str, Any]]] = {w: [] for w in WRAPPERS}
    for _ in range(rounds):
        for wrapper in WRAPPERS:
            argv = ["wrap", "--model", model, "--wrapper", wrapper]
            runs[wrapper].append(run_worker(_worker_module(model), argv, {}))
    param_bytes = runs["torchreparam"][0]["param_bytes"]
    rows: list[tuple[str, ...]] = []
    figures: dict[str, tuple[float, float]] = {}
    for wrapper, results in runs.items():
        peak = statistics.median(r["peak_extra"] for r in results)
        after = statistics.median(r["after_extra"] for r in results)
        seconds = statistics.median(r["seconds"] for r in results)
        figures[wrapper] = (peak / param_bytes, seconds)
        share = f"{100 * peak / param_bytes:.0f}%"
        rows.append((wrapper, _mb(peak), share, _mb(after), fmt_time(seconds)))
    ours, original = figures["torchreparam"], figures["original torchreparam"]
    memory = at_most("torchreparam peak extra", 100 * ours[0], 10, "%")
    timing = "met" if ours[1] <= original[1] else "missed"
    verdict = f"{memory}; wrap time {timing}: {ours[1] / original[1]:.2f}x the original's"
    return [
        Table(
            key="wrap",
            title=f"Wrapping {label}, {param_bytes / 2**20:,.0f} MiB of parameters",
            target="peak extra memory at most 10% of the parameter bytes (the original: +100%) "
            "and wrap time no worse than the original's",
            verdict=verdict,
            headers=("wrapper", "peak extra RSS", "of param bytes", "RSS after", "wrap time"),
            rows=rows,
            notes=[
                f"each wrap in a fresh process after building the model; medians of {rounds} "
                "processes per wrapper, interleaved",
                "peak: VmHWM, reset through /proc/self/clear_refs just before wrapping"
                if all(r["peak_reset"] for rs in runs.values() for r in rs)
                else "peak: VmHWM could not be reset: the figure includes the model's build",
            ],
        )
    ]
