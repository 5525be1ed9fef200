"""A hypernetwork: a network that emits the whole flat weight vector of another, end to end.

The task: "is this digit an `a` or a `b`?" for a pair of digits. The hypernetwork reads the
pair, coded as ``onehot(a) - onehot(b)``, and emits all the weights of a small MLP classifier
for it; nothing else is trained. It is trained on 36 of the 45 pairs, then asked for classifiers
for the 9 pairs it never saw, which it writes without any data of those pairs (zero-shot).
For reference, a population of 9 ordinary classifiers is trained directly on the held-out pairs.

torchreparam does the bookkeeping: the emitted weights are a population ``(pairs, num_params)``
fed straight into ``r(x, flat_param=thetas, in_dims=(0,))``, each pair with its own images, so
every classifier of every pair runs in one batched call and the gradients flow back into the
hypernetwork.

    python examples/hypernetwork.py            # full run (about 20 s on 2 CPU cores)
    python examples/hypernetwork.py --quick    # about 10 s
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from tqdm import tqdm

from torchreparam import ReparamModule

HELD_OUT = ((0, 6), (1, 7), (2, 3), (3, 5), (4, 9), (5, 8), (0, 8), (1, 4), (2, 7))


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


def code(pairs: Tensor) -> Tensor:
    """``onehot(a) - onehot(b)`` for ordered pairs ``(pairs, 2)``: ``(pairs, 10)``."""
    return F.one_hot(pairs[:, 0], 10).float() - F.one_hot(pairs[:, 1], 10).float()


def pair_batch(
    x: Tensor, y: Tensor, pairs: Tensor, per_digit: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """For every pair (a, b): ``per_digit`` images of each; targets 1 for a and 0 for b."""
    images = []
    for a, b in pairs.tolist():
        for digit in (a, b):
            pool = x[y == digit]
            images.append(pool[torch.randint(len(pool), (per_digit,), generator=gen)])
    images = torch.stack(images).view(len(pairs), 2 * per_digit, 64)
    targets = torch.cat([torch.ones(per_digit), torch.zeros(per_digit)]).expand(len(pairs), -1)
    return images, targets


def pair_accuracy(r: ReparamModule, thetas: Tensor, x: Tensor, y: Tensor, pairs: Tensor) -> Tensor:
    """Test accuracy of each pair's classifier on all test images of its two digits."""
    accs = []
    with torch.no_grad():
        for theta, (a, b) in zip(thetas, pairs.tolist(), strict=True):
            mask = (y == a) | (y == b)
            says_a = r(x[mask], flat_param=theta).squeeze(-1) > 0
            accs.append((says_a == (y[mask] == a)).float().mean())
    return torch.stack(accs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the models are tiny)"
    )
    parser.add_argument("--steps", type=int, help="training steps")
    args = parser.parse_args()
    steps = args.steps or (300 if args.quick else 1000)
    per_digit = 32
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)  # more only add overhead, a lot on a busy machine
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_data()

    all_pairs = list(itertools.combinations(range(10), 2))
    seen = [p for p in all_pairs if p not in HELD_OUT]
    ordered = torch.tensor(seen + [(b, a) for a, b in seen])  # both orientations
    unseen = torch.tensor(HELD_OUT)

    r = ReparamModule(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1)))
    r.population_strategy = "vmap"  # one batched call (and no timing-dependent choice)
    hyper = nn.Sequential(nn.Linear(10, 128), nn.ReLU(), nn.Linear(128, r.param_numel))
    with torch.no_grad():  # start by emitting an ordinary initialization, plus small changes
        hyper[-1].weight.mul_(0.1)
        hyper[-1].bias.copy_(r.flat_param)
    print(
        f"target MLP 64-32-1: {r.param_numel:,} weights, all emitted by a hypernetwork of "
        f"{sum(p.numel() for p in hyper.parameters()):,} parameters"
    )

    opt = torch.optim.Adam(hyper.parameters(), lr=1e-3)
    bar = tqdm(range(steps), desc="train hypernetwork", disable=None)
    for _ in bar:
        images, targets = pair_batch(x_train, y_train, ordered, per_digit, gen)
        thetas = hyper(code(ordered))  # (pairs, num_params): one classifier per pair
        logits = r(images, flat_param=thetas, in_dims=(0,)).squeeze(-1)  # (pairs, images)
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        opt.zero_grad()
        loss.backward()  # through the emitted weights into the hypernetwork
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")

    # Reference: ordinary classifiers, one per held-out pair, trained on that pair's own data.
    direct = r.flat_param.detach().expand(len(unseen), -1).clone().requires_grad_()
    direct_opt = torch.optim.Adam([direct], lr=1e-2)
    for _ in tqdm(range(steps // 2), desc="train direct classifiers", disable=None):
        images, targets = pair_batch(x_train, y_train, unseen, per_digit, gen)
        logits = r(images, flat_param=direct, in_dims=(0,)).squeeze(-1)
        direct_opt.zero_grad()
        F.binary_cross_entropy_with_logits(logits, targets).backward()
        direct_opt.step()

    every = torch.tensor([(a, b) for a in range(10) for b in range(10) if a != b])
    with torch.no_grad():
        acc = pair_accuracy(r, hyper(code(every)), x_test, y_test, every)
    held = torch.tensor([tuple(sorted(p)) in HELD_OUT for p in every.tolist()])
    acc_direct = pair_accuracy(r, direct.detach(), x_test, y_test, unseen)

    matrix = torch.full((10, 10), float("nan"))
    matrix[every[:, 0], every[:, 1]] = 100 * acc
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    image = ax.imshow(matrix.numpy(), cmap="viridis", vmin=80, vmax=100)
    for (a, b), unseen_pair in zip(every.tolist(), held.tolist(), strict=True):
        ax.text(b, a, f"{matrix[a, b]:.0f}", ha="center", va="center", fontsize=7, color="white")
        if unseen_pair:
            ax.add_patch(plt.Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, ec="red", lw=2))
    ax.set(xticks=range(10), yticks=range(10), xlabel="digit b", ylabel="digit a")
    ax.set_title("test accuracy (%) of the emitted 'a or b?' classifiers\n"
                 "red boxes: pairs never trained on (zero-shot)", fontsize=10)  # fmt: skip
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    figure = args.out / "hypernetwork.png"
    fig.savefig(figure, dpi=90)

    print(f"{steps} steps, each over all {len(ordered)} ordered training pairs at once")
    print(f"test accuracy of emitted classifiers on the {len(ordered)} training pairs: "
          f"{100 * acc[~held].mean():.1f}% (worst {100 * acc[~held].min():.1f}%)")  # fmt: skip
    print(
        f"test accuracy on the {int(held.sum())} held-out (ordered) pairs, zero-shot: "
        f"{100 * acc[held].mean():.1f}% (worst {100 * acc[held].min():.1f}%; chance 50%); "
        f"classifiers trained directly on those pairs: {100 * acc_direct.mean():.1f}%"
    )
    print(f"figure: {os.path.relpath(figure)}")


if __name__ == "__main__":
    main()
