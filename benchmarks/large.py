"""Compute-bound models: ResNet-18 forward+backward (per allocator), other models, Adam steps."""

from __future__ import annotations

from . import gpt2
from .context import Context
from .models import Model, conv4, resnet
from .peers import OURS, PLAIN, Peers, backward_contenders
from .report import TIMING_HEADERS, Table, at_most, timing_rows
from .subprocess_run import TUNED_MALLOC, run_worker, tables_from_json

__all__ = ["models_case", "resnet_case", "resnet_tables"]

_ALLOCATORS: dict[str, dict[str, str | None]] = {
    "default": {k: None for k in TUNED_MALLOC},
    "tuned": dict(TUNED_MALLOC),
}


def _backward_table(ctx: Context, model: Model, key: str, title: str) -> Table:
    p = Peers(ctx.on_device(model))
    budget = ctx.scaled(0.5, 10.0 if not ctx.smoke else 1.0)
    timings, failed = ctx.measure(backward_contenders(p), PLAIN, budget)
    return Table(
        key=key,
        title=title,
        target="",
        verdict="",
        headers=TIMING_HEADERS,
        rows=timing_rows(timings, failed),
    )


def resnet_tables(ctx: Context, allocator: str) -> list[Table]:
    """ResNet-18 forward+backward to the flat vector, in this process (a worker's body)."""
    model = resnet(image=32, batch=2) if ctx.smoke else resnet(image=64, batch=2)
    title = f"ResNet-18 forward+backward to the flat vector, {allocator} allocator"
    table = _backward_table(ctx, model, "resnet", title)
    table.notes.append(f"model: {model.name}, train mode")
    return [table]


def _ratio(table: Table, name: str) -> float:
    row = table.row(name)
    assert row is not None, f"{name} missing from {table.title}"
    return float(row[2].rstrip("x"))


def resnet_case(ctx: Context) -> list[Table]:
    """ResNet-18 forward+backward, once with glibc's default allocator, once tuned (workers)."""
    args = ["resnet", "--smoke"] if ctx.smoke else ["resnet"]
    tables = []
    for allocator, env in _ALLOCATORS.items():
        data = run_worker("benchmarks.worker", [*args, "--allocator", allocator], env)
        tables += tables_from_json(data)
    default, tuned = tables
    tuned.target = "at most 1.05x plain when memory is reused (MALLOC_MMAP_THRESHOLD_ and "
    tuned.target += "MALLOC_TRIM_THRESHOLD_ = 2147483647)"
    tuned.verdict = at_most("torchreparam", _ratio(tuned, OURS), 1.05)
    default.notes.append(
        "glibc's default: every allocation over 32 MB is a fresh mmap, so each fresh flat "
        "gradient is page-faulted in again (the plain module's gradients are many smaller "
        f"tensors); torchreparam {_ratio(default, OURS):.2f}x here, no target"
    )
    tuned.notes.append(
        "run in a subprocess with MALLOC_MMAP_THRESHOLD_=2147483647 "
        "MALLOC_TRIM_THRESHOLD_=2147483647 (glibc keeps freed memory and reuses it)"
    )
    return tables


def models_case(ctx: Context) -> list[Table]:
    """Forward+backward to the flat vector on the conv net and a small GPT-2 (no targets)."""
    conv = conv4(batch=5 if ctx.smoke else 25)
    tables = [_backward_table(ctx, conv, "models", f"Forward+backward, {conv.name}")]
    if gpt2.available():
        small = gpt2.gpt2(seq=16, batch=1) if ctx.smoke else gpt2.gpt2()
        tables.append(_backward_table(ctx, small, "models", f"Forward+backward, {small.name}"))
        tables[-1].notes.append("tied input and output embeddings: one slice of the flat vector")
    else:
        tables.append(_skipped("models", "Forward+backward, small GPT-2"))
    return tables


def _skipped(key: str, title: str) -> Table:
    return Table(key, title, "", "", ("contender",), [("skipped: transformers is not installed",)])
