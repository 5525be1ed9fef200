"""The whole suite: which cases run on which device, and the page they write."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch

from . import gpt2
from .context import Context, make_context
from .large import models_case, resnet_case
from .latency import backward_case, forward_case, per_tensor_case
from .maml import maml_case
from .optim import adam_case
from .population import population_case
from .population_attention import population_attention_case
from .population_cnn import population_cnn_case
from .report import Section, Table, environment, load_average, render_section
from .timing import threads
from .unroll import unroll_case
from .wrap import wrap_case

try:  # optional: a progress bar on a terminal
    from tqdm import tqdm
except ImportError:
    tqdm = None

__all__ = ["CASES", "GPU_CASES", "run_device", "run_suite"]

T = TypeVar("T")
Case = Callable[[Context], list[Table]]


def _wrap(ctx: Context) -> list[Table]:
    if gpt2.available() and not ctx.smoke:
        return wrap_case(ctx, "gpt2-124m", "GPT-2 small (124M, transformers)")
    return wrap_case(ctx, "resnet18", "ResNet-18")


CASES: dict[str, Case] = {
    "forward": forward_case,
    "backward": backward_case,
    "per-tensor": per_tensor_case,
    "maml": maml_case,
    "unroll": unroll_case,
    "population": population_case,
    "population-cnn": population_cnn_case,
    "population-attention": population_attention_case,
    "resnet": resnet_case,
    "wrap": _wrap,
    "adam": adam_case,
    "models": models_case,
}
# resnet and wrap measure the host allocator and RSS: CPU only.
GPU_CASES = ("forward", "backward", "per-tensor", "maml", "population", "adam", "models")
THREADS = 1


def _progress(items: Sequence[T], device: str) -> Iterable[T]:
    if tqdm is None:
        return items
    return tqdm(items, desc=f"bench ({device})", unit="case", disable=None, file=sys.stderr)


def run_device(device: str, smoke: bool, only: Sequence[str]) -> tuple[str, list[Table]]:
    """Run the selected cases on ``device``; returns the page section and its tables."""
    ctx = make_context(smoke, device)
    names = [n for n in only or CASES if device == "cpu" or n in GPU_CASES]
    tables: list[Table] = []
    seconds: dict[str, float] = {}
    load = load_average()
    with threads(THREADS):
        for name in _progress(names, device):
            start = time.perf_counter()
            tables += CASES[name](ctx)
            seconds[name] = time.perf_counter() - start
    b = ctx.budget
    spent = ", ".join(f"{n} {s:.0f} s" for n, s in seconds.items())
    intro = [
        f"{'Smoke run (tiny budgets, small models)' if smoke else 'Full run'}: "
        f"{b.rounds} rounds of blocks of about {b.block_s * 1e3:g} ms and {b.warmup} warm-up "
        "calls per contender; cases scale rounds and block lengths to their cost (the timing "
        f"tables' last column gives calls per block x rounds). Time per case: {spent}; "
        f"{sum(seconds.values()):.0f} s in all.",
    ]
    title = "CPU, one thread" if device == "cpu" else "CUDA"
    section = Section(title, intro, environment(device, THREADS, load), tables)
    return render_section(section), tables


def run_suite(
    *, smoke: bool = False, only: Sequence[str] = (), devices: Sequence[str] = ("cpu", "cuda")
) -> tuple[dict[str, str], list[Table]]:
    """Run the suite; returns (section name -> markdown, every table)."""
    unknown = sorted(set(only) - set(CASES))
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    sections: dict[str, str] = {}
    tables: list[Table] = []
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            continue
        sections[device], found = run_device(device, smoke, only)
        tables += found
    return sections, tables
