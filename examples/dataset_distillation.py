"""Dataset distillation: ten synthetic images that train a network almost as well as 1257 real.

Learns one synthetic 8x8 image per digit class, and the inner learning rate, such that a freshly
initialized MLP trained on those ten images alone, for a few SGD steps, classifies real digits
well (Wang et al., 2018, with random initializations). The images are learned by
differentiating the real-data loss through the whole inner training run.

torchreparam does the bookkeeping: each outer step trains a population of random initializations
``(inits, num_params)`` at once (one batched call per step), and ``torchreparam.unroll`` runs the
differentiable inner SGD steps, whose learning rate is a tensor that requires grad. Two settings:
10 inner steps with the whole unrolled graph in memory (``memory="full"``), and 10x as many,
100 inner steps, with ``memory="checkpoint"`` in two levels: the same exact gradient, from a
forward sweep that keeps only every 10th vector (``segment=10``) and a backward that sweeps one
segment again without a graph, keeping its 10 vectors, then recomputes and differentiates one
step at a time (``inner_segment=1``). So the 100-step unroll needs less memory than the 10-step
full one (10 stored vectors, 10 temporary ones and one step's graph, against ten steps'
graphs), not 8x as much. Peak memory of one outer step against the number of inner steps is
measured for full, one-level checkpointing (``segment=5``) and two levels, each point in a
fresh process. The
evaluation trains many fresh initializations the same way, each on the distilled images or on
its own random draw of real images (``in_dims=(0,)``), and compares their test accuracy.

    python examples/dataset_distillation.py            # full run (about 10 min on 2 CPU cores)
    python examples/dataset_distillation.py --quick    # about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from tqdm import tqdm

import torchreparam
from torchreparam import ReparamModule

INITS_PER_STEP, REAL_BATCH = 8, 256
Memory = Literal["full", "checkpoint"]


def load_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The bundled digits, standardized, split 70/30 (stratified, always the same split)."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).reshape(-1, 64)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=0
    )
    return x_train, y_train, x_test, y_test


def make_net() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def make_wrapper() -> ReparamModule:
    r = ReparamModule(make_net())
    # One batched call per step, batched matrix products written out. Not "vmap" here: its
    # linear layers pick other kernels when the images require grad (in the recomputation)
    # than when they do not (in the forward sweep); the last-bit differences that leaves can
    # flip a ReLU, and memory="checkpoint" then refuses the recomputed step as not reproduced.
    r.population_strategy = "batched"
    return r


def random_inits(r: ReparamModule, count: int) -> Tensor:
    """``count`` flat vectors ``(count, num_params)``, each a fresh default initialization."""
    return torch.stack(
        [r.layout.flatten(dict(make_net().named_parameters())) for _ in range(count)]
    )


def members_loss(r: ReparamModule, thetas: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Sum over the members of each one's mean cross-entropy on ``batch = (x, y)``.

    ``x`` is shared by all members ``(images, 64)`` or one set per member ``(members, images,
    64)``. Members are independent: the gradient of the sum holds each one's own gradient.
    """
    x, y = batch
    in_dims = (0,) if x.dim() == 3 else None
    logits = r(x, flat_param=thetas, in_dims=in_dims)  # (members, images, 10)
    labels = y.expand(logits.shape[:2])
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    return loss / labels.shape[1]


def train(
    r: ReparamModule,
    thetas: Tensor,
    x: Tensor,
    y: Tensor,
    lr: Tensor,
    steps: int,
    memory: Memory = "full",
    segment: int = 1,
    inner_segment: int | None = None,
) -> Tensor:
    """``steps`` full-batch SGD steps of every member of the population ``thetas``.

    Differentiable w.r.t. ``x``, ``lr`` and ``thetas`` when they require grad (``memory``:
    ``"full"`` keeps the whole graph, ``"checkpoint"`` recomputes it segment by segment, and
    with ``inner_segment`` each segment ``inner_segment`` steps at a time).
    """
    kw: dict[str, Any] = {}
    if memory == "checkpoint":
        kw = {"segment": segment, "inner_segment": inner_segment}
    with torch.set_grad_enabled(torch.is_grad_enabled() and (x.requires_grad or lr.requires_grad)):
        return torchreparam.unroll(
            lambda theta, batch: members_loss(r, theta, batch),
            thetas,
            [(x, y)] * steps,
            optimizer="sgd",
            memory=memory,
            lr=lr,
            **kw,
        )


def outer_loss(
    r: ReparamModule,
    synthetic: Tensor,
    lr_logit: Tensor,
    steps: int,
    memory: Memory,
    segment: int,
    inner_segment: int | None,
    real: tuple[Tensor, Tensor],
) -> Tensor:
    """Real-data loss of fresh initializations trained ``steps`` steps on the synthetic images,
    with the inner learning rate ``sigmoid(lr_logit)``."""
    thetas = random_inits(r, INITS_PER_STEP)
    lr = torch.sigmoid(lr_logit)
    trained = train(
        r, thetas, synthetic, torch.arange(10), lr, steps, memory, segment, inner_segment
    )
    x, y = real
    logits = r(x, flat_param=trained)  # (inits, real_batch, 10)
    return F.cross_entropy(logits.flatten(0, 1), y.repeat(INITS_PER_STEP))


def distill(
    r: ReparamModule,
    x_train: Tensor,
    y_train: Tensor,
    steps: int,
    memory: Memory,
    segment: int,
    inner_segment: int | None,
    outer_steps: int,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor, float]:
    """Learn ten images and the inner learning rate; returns them and the seconds per step."""
    synthetic = torch.randn(10, 64, generator=gen).requires_grad_()  # one per class, from noise
    # The inner learning rate, sigmoid(z): kept in (0, 1), since past about 2 the inner steps
    # diverge for some initializations (and the images with them). It starts at 0.12.
    lr_logit = torch.tensor(-2.0, requires_grad=True)
    opt = torch.optim.Adam([synthetic, lr_logit], lr=0.02)
    bar = tqdm(range(outer_steps), desc=f"distill, {steps} steps ({memory})", disable=None)
    start = time.perf_counter()
    for _ in bar:
        batch = torch.randint(len(x_train), (REAL_BATCH,), generator=gen)
        real = (x_train[batch], y_train[batch])
        loss = outer_loss(r, synthetic, lr_logit, steps, memory, segment, inner_segment, real)
        opt.zero_grad()
        loss.backward()  # through every inner step into the images and the learning rate
        opt.step()
        bar.set_postfix(real_loss=f"{loss.item():.3f}", lr=f"{torch.sigmoid(lr_logit).item():.3f}")
    seconds = (time.perf_counter() - start) / max(outer_steps, 1)
    return synthetic.detach(), torch.sigmoid(lr_logit.detach()), seconds


@torch.no_grad()
def accuracy(r: ReparamModule, thetas: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Accuracy of every member on ``(x, y)``: ``(members,)``."""
    return (r(x, flat_param=thetas).argmax(-1) == y).float().mean(1)


def real_images(x: Tensor, y: Tensor, draws: int, gen: torch.Generator) -> Tensor:
    """``draws`` random sets of one real training image per class: ``(draws, 10, 64)``."""
    picks = [
        torch.stack([x[y == c][torch.randint(int((y == c).sum()), (1,), generator=gen)][0]
                     for c in range(10)])
        for _ in range(draws)
    ]  # fmt: skip
    return torch.stack(picks)


# ---- peak memory of one outer step, each measurement in a fresh process --------------------


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_child(memory: Memory, steps: int, segment: int, inner_segment: int | None) -> None:
    """One outer step (forward and backward) in this fresh process; prints its peak RSS growth.

    A 1-step outer step first (libraries and kernels loaded), then the peak RSS is reset
    (``/proc/self/clear_refs``), and the growth of the peak over the resident size before the
    step is the step's peak memory.
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x_train, y_train, _, _ = load_data()
    r = make_wrapper()
    synthetic = torch.randn(10, 64, requires_grad=True)
    lr_logit = torch.tensor(-2.0, requires_grad=True)
    real = (x_train[:REAL_BATCH], y_train[:REAL_BATCH])
    outer_loss(r, synthetic, lr_logit, 1, memory, 1, None, real).backward()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (VmHWM, ru_maxrss) to the current one
    before = _proc_kib("VmRSS")
    outer_loss(r, synthetic, lr_logit, steps, memory, segment, inner_segment, real).backward()
    print(json.dumps({"peak_mib": (_proc_kib("VmHWM") - before) / 1024}))


def measure(memory: Memory, steps: int, segment: int, inner_segment: int | None = None) -> float:
    """Peak memory (MiB) of one outer step with ``steps`` inner steps, in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    inner = str(inner_segment or 0)
    command = [sys.executable, __file__, "--measure", memory, str(steps), str(segment), inner]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement {memory} K={steps} failed:\n{done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the models are tiny)"
    )
    parser.add_argument("--outer-steps", type=int, help="distillation (outer) steps, 10 inner")
    parser.add_argument(
        "--long-outer-steps", type=int, help="distillation (outer) steps with 100 inner steps"
    )
    # memory steps segment inner_segment (0: one level)
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        mode: Memory = "checkpoint" if args.measure[0] == "checkpoint" else "full"
        inner = int(args.measure[3]) or None
        measure_child(mode, int(args.measure[1]), int(args.measure[2]), inner)
        return
    outer_steps = args.outer_steps or (150 if args.quick else 1000)
    long_outer_steps = args.long_outer_steps or (3 if args.quick else 200)
    inner_steps, long_steps, segment, inner_segment = 10, 100, 10, 1
    eval_inits = 20 if args.quick else 100
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)  # more only add overhead, a lot on a busy machine
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_data()

    r = make_wrapper()
    print(f"MLP 64-128-10: {r.param_numel:,} parameters; {len(x_train)} real training images")

    # Today's setting: 10 inner steps, the whole unrolled graph kept (memory="full").
    synthetic, learned_lr, sec_short = distill(
        r, x_train, y_train, inner_steps, "full", 1, None, outer_steps, gen
    )
    # 10x the inner steps, exact gradients in less memory (memory="checkpoint", two levels).
    long_synthetic, long_lr, sec_long = distill(
        r, x_train, y_train, long_steps, "checkpoint", segment, inner_segment, long_outer_steps,
        gen,
    )  # fmt: skip

    # Evaluation: fresh initializations, trained the same way on 10 distilled or 10 real images.
    classes = torch.arange(10)
    fresh = random_inits(r, eval_inits)
    acc_distilled = accuracy(
        r, train(r, fresh, synthetic, classes, learned_lr, inner_steps), x_test, y_test
    )
    acc_long = accuracy(
        r, train(r, fresh, long_synthetic, classes, long_lr, long_steps), x_test, y_test
    )
    real = real_images(x_train, y_train, eval_inits, gen)  # each init its own random draw
    grid = (0.03, 0.1, 0.3, 1.0, 3.0)  # the baseline's best, judged on the real training set
    acc_real, best_lr = {}, {}
    for steps in (inner_steps, long_steps):
        baseline = {lr: train(r, fresh, real, classes, torch.tensor(lr), steps) for lr in grid}
        best = max(grid, key=lambda lr: accuracy(r, baseline[lr], x_train, y_train).mean())
        acc_real[steps], best_lr[steps] = accuracy(r, baseline[best], x_test, y_test), best
    lr_full = torch.tensor(best_lr[inner_steps])
    full_data = train(r, fresh[:10], x_train, y_train, lr_full, 30 * inner_steps)
    acc_full = accuracy(r, full_data, x_test, y_test)

    fig, axes = plt.subplots(3, 10, figsize=(10, 3.5))
    rows = (
        (synthetic, f"distilled,\n{inner_steps} steps"),
        (long_synthetic, f"distilled,\n{long_steps} steps"),
        (real[0], "random real"),
    )
    for row, (images, name) in zip(axes, rows, strict=True):
        for c, ax in enumerate(row):
            ax.imshow(images[c].view(8, 8).numpy(), cmap="gray_r")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(str(c), fontsize=9)
        row[0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    figure = args.out / "dataset_distillation.png"
    fig.savefig(figure, dpi=80)
    plt.close(fig)

    def report(acc: Tensor) -> str:
        return f"{100 * acc.mean():.1f} +- {100 * 1.96 * acc.std() / len(acc) ** 0.5:.1f}%"

    print(
        f"{outer_steps} outer steps x {INITS_PER_STEP} random inits, {inner_steps} inner steps "
        f"(memory='full'): {sec_short:.2f} s per outer step"
    )
    print(
        f"{long_outer_steps} outer steps x {INITS_PER_STEP} random inits, {long_steps} inner "
        f"steps (memory='checkpoint', segment={segment}, inner_segment={inner_segment}): "
        f"{sec_long:.2f} s per outer step"
    )
    print(f"learned inner learning rate: {learned_lr.item():.3f} ({inner_steps} steps), "
          f"{long_lr.item():.3f} ({long_steps} steps)")  # fmt: skip
    for steps, acc in ((inner_steps, acc_distilled), (long_steps, acc_long)):
        print(
            f"test accuracy after {steps} steps from {eval_inits} fresh inits (95% CI): "
            f"10 distilled images {report(acc)} vs 10 random real images "
            f"{report(acc_real[steps])} (best lr {best_lr[steps]:g})"
        )
    print(
        f"for scale, all {len(x_train)} real training images, {30 * inner_steps} steps: "
        f"{report(acc_full)}"
    )
    print(f"figure: {os.path.relpath(figure)}")

    if not os.path.exists("/proc/self/clear_refs"):
        print("memory figure skipped: it reads peak memory from Linux's /proc")
        return
    if args.quick:  # a fresh process per point: ~10 s each here, too slow for a quick run
        print("memory figure: skipped with --quick (run without it to measure and plot)")
        return
    ks = (10, 20, 50, 100)
    settings: dict[str, tuple[Memory, int, int | None]] = {
        "memory='full'": ("full", 1, None),
        "memory='checkpoint', segment=5": ("checkpoint", 5, None),
        f"checkpoint, segment={segment}, inner_segment={inner_segment}": (
            "checkpoint", segment, inner_segment,
        ),
    }  # fmt: skip
    peaks = {name: [measure(m, k, s, i) for k in ks] for name, (m, s, i) in settings.items()}
    for name, values in peaks.items():
        listed = ", ".join(f"K={k} {v:.1f}" for k, v in zip(ks, values, strict=True))
        print(f"peak memory of one outer step (MiB over the process before it), {name}: {listed}")
    today = peaks["memory='full'"][0]
    for name, values in list(peaks.items())[1:]:
        print(f"{name}, K={ks[-1]}: {values[-1] / today:.2f}x the memory of full, K={ks[0]}")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, values in peaks.items():
        ax.plot(ks, values, marker="o", label=name)
    ax.axhline(today, color="gray", ls=":", lw=1, label=f"full, K={ks[0]} (today)")
    ax.set(xlabel="inner SGD steps K", ylabel="peak memory of one outer step (MiB)")
    ax.set_title(
        f"{INITS_PER_STEP} inits x MLP 64-128-10, forward + backward; each point a fresh\n"
        "process: peak RSS (VmHWM, reset after a warm-up step) minus RSS before the step",
        fontsize=8,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    memory_figure = args.out / "dataset_distillation_memory.png"
    fig.savefig(memory_figure, dpi=100)
    print(f"figure: {os.path.relpath(memory_figure)}")


if __name__ == "__main__":
    main()
