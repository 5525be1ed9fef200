"""MAML: 5-way few-shot classification of digits that meta-training never saw.

Meta-training sees digits 0-4 only, meta-testing digits 5-9: 5-way 1-shot and 5-shot tasks,
adapted with a few SGD steps from the meta-learned initialization, against the same steps from
the random initialization it started from (that baseline gets its best learning rate from a
grid, chosen on tasks of digits 0-4). Five classes are too few to meta-learn from (the
initialization would just learn to tell 0-4 apart), so, as is usual with Omniglot, each of the
8 rotations and reflections of each digit 0-4 counts as a class of its own: 40 meta-training
classes. Every task draws 5 of them under a random labelling. Digits 5-9 are never transformed.

torchreparam does the bookkeeping: a meta-batch of tasks is a population of flat vectors
``(tasks, num_params)``, each with its own support images (``in_dims=(0,)``), so every inner step
of every task is one batched call and one tensor operation, differentiable end to end. The inner
learning rates are learned, one per weight and bias tensor (MAML++'s per-layer rates), spread over
the vector by ``layout.expand``.

Then many inner steps (1-shot, 20 steps, a fixed inner learning rate): second-order MAML through
``torchreparam.unroll(..., memory="checkpoint")``, the exact meta-gradient with one stored vector
per segment of 5 steps and one segment's graph instead of every step's graph, against
first-order MAML (``memory="truncated", window=0``: the meta-gradient at the adapted vector
passed straight to the initialization), whose memory does not grow with the steps. Peak memory
of one meta-step against the number of inner steps is measured for full, checkpoint and
first-order, each point in a fresh process.

    python examples/maml_fewshot.py            # full run (about 10 minutes on 2 CPU cores)
    python examples/maml_fewshot.py --quick    # about a minute
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
from torch import Tensor, nn
from tqdm import tqdm

import torchreparam
from torchreparam import ReparamModule

TRAIN_DIGITS, TEST_DIGITS = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
WAYS, QUERY = 5, 15
META_BATCH, SEGMENT = 16, 5
Memory = Literal["full", "checkpoint", "truncated"]
MODE_NAMES: dict[Memory, str] = {
    "full": "second-order, memory='full'",
    "checkpoint": f"second-order, memory='checkpoint', segment={SEGMENT}",
    "truncated": "first-order, memory='truncated', window=0",
}


def make_wrapper() -> ReparamModule:
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
    r = ReparamModule(nn.Sequential(*net, nn.Linear(128, WAYS)))
    # One batched call per step, batched matrix products written out (and no timing-dependent
    # choice). Unlike "vmap", it computes the same bits whether or not an input requires grad,
    # which memory="checkpoint" checks when it recomputes a step.
    r.population_strategy = "batched"
    return r


def digit_classes() -> tuple[list[Tensor], list[Tensor]]:
    """Images ``(n, 64)`` per class: the 40 meta-training classes and the 5 test classes."""
    digits = load_digits()  # 1797 8x8 images, bundled with scikit-learn
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    train = []
    for digit in TRAIN_DIGITS:
        for k in range(4):  # 4 rotations, each also transposed: the 8 symmetries of the square
            turned = torch.rot90(x[y == digit], k, (1, 2))
            train += [turned.reshape(-1, 64), turned.transpose(1, 2).reshape(-1, 64)]
    return train, [x[y == digit].reshape(-1, 64) for digit in TEST_DIGITS]


def sample_tasks(
    classes: list[Tensor], tasks: int, shots: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``tasks`` 5-way tasks: support ``(tasks, 5*shots, 64)``, query ``(tasks, 5*15, 64)``, labels.

    Each task draws 5 of ``classes`` in a random order (label i is the i-th drawn class), then
    ``shots`` support and ``QUERY`` query images of each, without overlap.
    """
    support, query = [], []
    for _ in range(tasks):
        order = torch.randperm(len(classes), generator=gen)[:WAYS]
        s, q = [], []
        for i in order.tolist():
            pool = classes[i]
            pick = torch.randperm(len(pool), generator=gen)[: shots + QUERY]
            s.append(pool[pick[:shots]])
            q.append(pool[pick[shots:]])
        support.append(torch.cat(s))
        query.append(torch.cat(q))
    ys = torch.arange(WAYS).repeat_interleave(shots).expand(tasks, -1)
    yq = torch.arange(WAYS).repeat_interleave(QUERY).expand(tasks, -1)
    return torch.stack(support), ys, torch.stack(query), yq


def task_losses(r: ReparamModule, thetas: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of each task's vector on its own images: ``(tasks,)``, in one batched call."""
    logits = r(x, flat_param=thetas, in_dims=(0,))  # (tasks, images, WAYS)
    return (
        F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
    )


def adapt(
    r: ReparamModule, theta0: Tensor, lr: Tensor, x: Tensor, y: Tensor, steps: int, meta: bool
) -> list[Tensor]:
    """SGD steps on every task from ``theta0``; the population ``(tasks, num_params)`` per step.

    With ``meta=True`` the steps stay differentiable w.r.t. ``theta0`` and ``lr`` (second order).
    """
    thetas = theta0.expand(len(x), -1)  # one row per task; a view, so theta0 gets the gradients
    trajectory = [thetas]
    for _ in range(steps):
        if not meta:
            thetas = thetas.detach().requires_grad_()
        # Tasks are independent, so the gradient of the summed losses holds each task's own.
        (grads,) = torch.autograd.grad(
            task_losses(r, thetas, x, y).sum(), thetas, create_graph=meta
        )
        thetas = thetas - lr * grads
        trajectory.append(thetas)
    return trajectory


def adapt_unrolled(
    r: ReparamModule,
    theta0: Tensor,
    lr: float,
    x: Tensor,
    y: Tensor,
    steps: int,
    memory: Memory,
) -> Tensor:
    """``steps`` SGD steps on every task from ``theta0`` by ``torchreparam.unroll``: the adapted
    population ``(tasks, num_params)``, differentiable w.r.t. ``theta0`` (second order for
    ``"full"`` and ``"checkpoint"``, first order for ``"truncated"`` with ``window=0``)."""
    kw: dict[str, Any] = {
        "full": {},
        "checkpoint": {"segment": SEGMENT},
        "truncated": {"window": 0},
    }
    return torchreparam.unroll(
        lambda thetas, batch: task_losses(r, thetas, *batch).sum(),  # each task's own gradient
        theta0.expand(len(x), -1),
        [(x, y)] * steps,
        optimizer="sgd",
        memory=memory,
        lr=lr,
        **kw[memory],
    )


def meta_train_long(
    r: ReparamModule,
    init: Tensor,
    classes: list[Tensor],
    steps: int,
    memory: Memory,
    meta_steps: int,
    lr: float,
    gen: torch.Generator,
) -> tuple[Tensor, float]:
    """1-shot MAML with ``steps`` inner steps at a fixed learning rate: the learned init, and
    the seconds per meta-step."""
    theta0 = init.clone().requires_grad_()
    opt = torch.optim.Adam([theta0], 1e-3)
    bar = tqdm(range(meta_steps), desc=f"meta-train, {steps} steps ({memory})", disable=None)
    start = time.perf_counter()
    for _ in bar:
        xs, ys, xq, yq = sample_tasks(classes, META_BATCH, 1, gen)
        adapted = adapt_unrolled(r, theta0, lr, xs, ys, steps, memory)
        loss = task_losses(r, adapted, xq, yq).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(query_loss=f"{loss.item():.3f}")
    return theta0.detach(), (time.perf_counter() - start) / max(meta_steps, 1)


# ---- peak memory of one meta-step, each measurement in a fresh process ---------------------


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_child(memory: Memory, steps: int) -> None:
    """One 1-shot meta-step (forward and backward) in this fresh process: its peak RSS growth.

    A 1-step meta-step first (libraries and kernels loaded), then the peak RSS is reset
    (``/proc/self/clear_refs``); the peak's growth over the resident size before the step is
    the step's peak memory.
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    r = make_wrapper()
    theta0 = r.flat_param.detach().clone().requires_grad_()
    xs, ys, xq, yq = sample_tasks(digit_classes()[0], META_BATCH, 1, gen)

    def meta_step(k: int) -> None:
        adapted = adapt_unrolled(r, theta0, 0.1, xs, ys, k, memory)
        task_losses(r, adapted, xq, yq).mean().backward()

    meta_step(1)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (VmHWM, ru_maxrss) to the current one
    before = _proc_kib("VmRSS")
    meta_step(steps)
    print(json.dumps({"peak_mib": (_proc_kib("VmHWM") - before) / 1024}))


def measure(memory: Memory, steps: int) -> float:
    """Peak memory (MiB) of one meta-step with ``steps`` inner steps, in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    command = [sys.executable, __file__, "--measure", memory, str(steps)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement {memory} K={steps} failed:\n{done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"])


@torch.no_grad()
def accuracy(r: ReparamModule, thetas: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return (r(x, flat_param=thetas, in_dims=(0,)).argmax(-1) == y).float().mean(1)


def evaluate(
    r: ReparamModule, theta0: Tensor, lr: Tensor, tasks: tuple[Tensor, ...], steps: int
) -> Tensor:
    """Query accuracy of every task after 0, 1, ..., ``steps`` steps: ``(steps + 1, tasks)``."""
    xs, ys, xq, yq = tasks
    trajectory = adapt(r, theta0.detach(), lr.detach(), xs, ys, steps, meta=False)
    return torch.stack([accuracy(r, thetas, xq, yq) for thetas in trajectory])


def mean_ci(acc: Tensor) -> str:
    half = 1.96 * acc.std() / acc.numel() ** 0.5
    return f"{100 * acc.mean():.1f} +- {100 * half:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the models are tiny)"
    )
    parser.add_argument("--meta-steps", type=int, help="meta-training steps per shot setting")
    parser.add_argument("--test-tasks", type=int, help="meta-test tasks per shot setting")
    parser.add_argument(
        "--long-meta-steps", type=int, help="meta-training steps with 20 inner steps, per order"
    )
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # memory steps
    args = parser.parse_args()
    if args.measure:
        modes: tuple[Memory, ...] = ("full", "checkpoint", "truncated")
        measure_child(modes[modes.index(args.measure[0])], int(args.measure[1]))
        return
    meta_steps = args.meta_steps or (150 if args.quick else 1500)
    test_tasks = args.test_tasks or (200 if args.quick else 600)
    long_meta_steps = args.long_meta_steps or (10 if args.quick else 400)
    inner_steps, meta_batch, long_steps, long_lr = 5, META_BATCH, 20, 0.1
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)  # more only add overhead, a lot on a busy machine
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    train_classes, test_classes = digit_classes()

    r = make_wrapper()
    random_init = r.flat_param.detach().clone()
    print(f"MLP 64-128-128-{WAYS}: {r.param_numel:,} parameters in one flat vector")

    results, curves, grid = {}, {}, (0.03, 0.1, 0.3, 1.0, 3.0)
    for shots in (1, 5):
        # The baseline's learning rate: the best of the grid on tasks of the digits 0-4 as they are.
        val = sample_tasks(train_classes[::8], 200, shots, gen)
        val_acc = [
            evaluate(r, random_init, torch.tensor(lr), val, inner_steps)[-1].mean() for lr in grid
        ]
        baseline_lr = torch.tensor(grid[int(torch.stack(val_acc).argmax())])

        theta0 = random_init.clone().requires_grad_()
        log_lrs = torch.full((len(r.layout),), 0.3).log().requires_grad_()  # one per tensor
        groups: list[dict[str, Any]] = [{"params": [theta0]}, {"params": [log_lrs], "lr": 3e-3}]
        opt = torch.optim.Adam(groups, 1e-3)
        bar = tqdm(range(meta_steps), desc=f"meta-train {shots}-shot", disable=None)
        for _ in bar:
            xs, ys, xq, yq = sample_tasks(train_classes, meta_batch, shots, gen)
            lr = r.layout.expand(log_lrs.exp())  # (num_params,), differentiable w.r.t. log_lrs
            adapted = adapt(r, theta0, lr, xs, ys, inner_steps, meta=True)[-1]
            loss = task_losses(r, adapted, xq, yq).mean()
            opt.zero_grad()
            loss.backward()  # through every inner step into theta0 and the learning rates
            opt.step()
            bar.set_postfix(query_loss=f"{loss.item():.3f}")

        test = sample_tasks(test_classes, test_tasks, shots, gen)
        maml = evaluate(r, theta0, r.layout.expand(log_lrs.exp()), test, inner_steps)
        scratch = evaluate(r, random_init, baseline_lr, test, inner_steps)
        results[shots] = (maml[-1], scratch[-1], log_lrs.exp().detach(), baseline_lr)
        curves[shots] = (maml, scratch)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, shots in zip(axes, (1, 5), strict=True):
        for acc, label in zip(
            curves[shots], ("MAML initialization", "random initialization (best lr)"), strict=True
        ):
            mean = 100 * acc.mean(1).numpy()  # matplotlib takes numpy arrays
            half = 100 * 1.96 * acc.std(1).numpy() / acc.shape[1] ** 0.5
            ax.plot(range(inner_steps + 1), mean, marker="o", ms=3, label=label)
            ax.fill_between(range(inner_steps + 1), mean - half, mean + half, alpha=0.3)
        ax.set(title=f"5-way {shots}-shot, digits 5-9", xlabel="inner SGD steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("query accuracy (%)")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    figure = args.out / "maml_fewshot.png"
    fig.savefig(figure, dpi=100)

    print(
        f"meta-trained on digits {TRAIN_DIGITS} (x 8 symmetries = {len(train_classes)} classes), "
        f"tested on held-out digits {TEST_DIGITS}"
    )
    print(f"{meta_steps} meta-steps x {meta_batch} tasks per setting, {inner_steps} inner steps")
    for shots, (maml_acc, scratch_acc, lrs, baseline_lr) in results.items():
        rates = ", ".join(f"{n} {v:.2f}" for n, v in zip(r.layout.names, lrs.tolist(), strict=True))
        print(f"5-way {shots}-shot inner learning rates learned: {rates}")
        print(
            f"5-way {shots}-shot baseline's learning rate, best of {grid}: {baseline_lr.item():g}"
        )
        print(
            f"5-way {shots}-shot accuracy after {inner_steps} steps, mean over {test_tasks} test "
            f"tasks (95% CI): MAML init {mean_ci(maml_acc)} vs random init {mean_ci(scratch_acc)}"
        )
        for acc, name in zip(curves[shots], ("MAML init", "random init"), strict=True):
            steps = ", ".join(f"{100 * a:.1f}" for a in acc.mean(1).tolist())
            print(f"5-way {shots}-shot mean accuracy after 0, 1, ... steps, {name}: {steps}")
    print(f"figure: {os.path.relpath(figure)}")

    # Many inner steps: exact second order in bounded memory (checkpoint) against first order.
    test = sample_tasks(test_classes, test_tasks, 1, gen)
    lr_t = torch.tensor(long_lr)
    long_acc = {"random init": evaluate(r, random_init, lr_t, test, long_steps)[-1]}
    orders: tuple[Memory, ...] = ("checkpoint", "truncated")
    seconds = {}
    for memory in orders:
        init, seconds[memory] = meta_train_long(
            r, random_init, train_classes, long_steps, memory, long_meta_steps, long_lr, gen
        )
        long_acc[MODE_NAMES[memory]] = evaluate(r, init, lr_t, test, long_steps)[-1]
    print(
        f"{long_meta_steps} meta-steps x {meta_batch} tasks, 1-shot, {long_steps} inner steps "
        f"at a fixed learning rate {long_lr:g}; seconds per meta-step: "
        + ", ".join(f"{MODE_NAMES[m]} {t:.2f}" for m, t in seconds.items())
    )
    for name, acc in long_acc.items():
        print(
            f"5-way 1-shot accuracy after {long_steps} steps, mean over {test_tasks} test tasks "
            f"(95% CI), {name}: {mean_ci(acc)}"
        )

    if not os.path.exists("/proc/self/clear_refs"):
        print("memory figure skipped: it reads peak memory from Linux's /proc")
        return
    if args.quick:  # a fresh process per point: ~10 s each here, too slow for a quick run
        print("memory figure: skipped with --quick (run without it to measure and plot)")
        return
    ks = (5, 10, 20, 40)
    peaks = {m: [measure(m, k) for k in ks] for m in MODE_NAMES}
    for m, values in peaks.items():
        listed = ", ".join(f"K={k} {v:.1f}" for k, v in zip(ks, values, strict=True))
        print(f"peak memory of one meta-step (MiB over the process before it), {m}: {listed}")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for m, values in peaks.items():
        ax.plot(ks, values, marker="o", label=MODE_NAMES[m])
    ax.set(xlabel="inner SGD steps K", ylabel="peak memory of one meta-step (MiB)")
    ax.set_title(
        f"{meta_batch} tasks x MLP 64-128-128-5, 1-shot, forward + backward; each point a fresh\n"
        "process: peak RSS (VmHWM, reset after a warm-up step) minus RSS before the step",
        fontsize=8,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    memory_figure = args.out / "maml_fewshot_memory.png"
    fig.savefig(memory_figure, dpi=100)
    print(f"figure: {os.path.relpath(memory_figure)}")


if __name__ == "__main__":
    main()
