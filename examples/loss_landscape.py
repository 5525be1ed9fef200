"""A 2-D slice of the loss landscape around a trained network (Li et al., 2018).

Trains a tiny conv net on the digits, then evaluates the loss at ``theta + a * d1 + b * d2`` on
a grid of ``(a, b)``, where ``d1`` and ``d2`` are random directions that are *filter-normalized*:
each filter (each output channel of a conv layer, each output neuron of a linear layer) of a
direction is rescaled to the norm of the same filter in ``theta``, and biases are left out. This
makes the picture independent of the scale invariance of ReLU networks, so slices of different
networks are comparable.

torchreparam does the bookkeeping: the trained weights are one flat vector, the directions are
built filter by filter through ``layout.view`` (views into the flat direction, edited in place),
and each row of the grid is a population of flat vectors ``(points, num_params)`` evaluated in
one call: ``r(x, flat_param=row)``.

    python examples/loss_landscape.py            # full run (about 30 s on 2 CPU cores)
    python examples/loss_landscape.py --quick    # about 13 s
"""

from __future__ import annotations

import argparse
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


def load_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The bundled digits as ``(N, 1, 8, 8)``, standardized, split 70/30 (always the same)."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=0
    )
    return x_train, y_train, x_test, y_test


def filter_normalized_direction(r: ReparamModule, theta: Tensor, gen: torch.Generator) -> Tensor:
    """A random direction whose every filter has the norm of the same filter of ``theta``."""
    direction = torch.randn(theta.shape, generator=gen)
    for entry in r.layout:
        d, w = r.layout.view(direction, entry.name), r.layout.view(theta, entry.name)
        if d.dim() <= 1:
            d.zero_()  # biases: left out of the directions, as in the paper
        else:  # dim 0 indexes the filters: conv output channels, linear output neurons
            dims = tuple(range(1, d.dim()))
            norm = torch.linalg.vector_norm
            d.mul_(norm(w, dim=dims, keepdim=True) / norm(d, dim=dims, keepdim=True))
    return direction


@torch.no_grad()
def losses(r: ReparamModule, thetas: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and accuracy of every vector of the population ``thetas``."""
    logits = r(x, flat_param=thetas)  # (points, images, 10): one call for all the points
    loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(thetas)), reduction="none")
    return loss.view(len(thetas), -1).mean(1), (logits.argmax(-1) == y).float().mean(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the models are tiny)"
    )
    parser.add_argument("--grid", type=int, help="grid points per axis")
    args = parser.parse_args()
    size = (args.grid or (21 if args.quick else 41)) // 2 * 2 + 1  # odd: the center is on it
    epochs = 10 if args.quick else 30
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)  # more only add overhead, a lot on a busy machine
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_data()

    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),                   # 16 x 8 x 8
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),        # 32 x 4 x 4
        nn.Flatten(), nn.Linear(512, 10),
    )  # fmt: skip
    r = ReparamModule(net)
    # A population runs as one vmap'd call or as a loop; "auto" (the default) times both once.
    # For convolutions on CPU the loop is faster; fixing it also keeps results bit-reproducible.
    r.population_strategy = "loop"
    print(f"conv net: {r.param_numel:,} parameters in one flat vector")

    opt = torch.optim.Adam(r.parameters(), lr=3e-3)  # flat_param is an ordinary parameter
    batches = -(-len(x_train) // 64)
    for _ in tqdm(range(epochs), desc="train", disable=None):
        order = torch.randperm(len(x_train), generator=gen)
        for batch in order.chunk(batches):
            opt.zero_grad()
            F.cross_entropy(r(x_train[batch]), y_train[batch]).backward()
            opt.step()
    theta = r.flat_param.detach().clone()

    d1 = filter_normalized_direction(r, theta, gen)
    d2 = filter_normalized_direction(r, theta, gen)
    coords = torch.arange(size) / (size // 2) - 1  # -1 ... 1, with an exact 0 in the middle
    train_loss, test_loss = torch.empty(size, size), torch.empty(size, size)
    test_acc = torch.empty(size, size)
    for i, b in enumerate(tqdm(coords, desc="landscape rows", disable=None)):
        row = theta + coords[:, None] * d1 + b * d2  # (size, num_params): one row of the grid
        train_loss[i] = losses(r, row, x_train, y_train)[0]
        test_loss[i], test_acc[i] = losses(r, row, x_test, y_test)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    levels = torch.logspace(-3, 1, 17).tolist()
    ab = coords.numpy()  # matplotlib takes numpy arrays
    for ax, z, name in zip(axes, (train_loss, test_loss), ("training", "test"), strict=True):
        filled = ax.contourf(ab, ab, z.clamp(1e-3, 10).numpy(), levels, cmap="viridis", norm="log")
        lines = ax.contour(ab, ab, z.numpy(), levels=levels[::4], colors="white", linewidths=0.6)
        ax.clabel(lines, fontsize=7, fmt="%.2g")
        ax.plot(0, 0, "r*", ms=10)
        ax.set(title=f"{name} loss", xlabel="a  (direction d1)", aspect="equal")
    axes[0].set_ylabel("b  (direction d2)")
    fig.colorbar(filled, ax=axes, label="cross-entropy (log scale)", format="%.2g")
    fig.suptitle("loss at theta + a*d1 + b*d2, filter-normalized random directions", fontsize=10)
    figure = args.out / "loss_landscape.png"
    fig.savefig(figure, dpi=80)

    def border(z: Tensor) -> Tensor:
        return torch.cat([z[[0, -1]].flatten(), z[1:-1, [0, -1]].flatten()])

    center = size // 2

    def lowest(z: Tensor) -> str:
        i = int(z.argmin())
        a, b = coords[i % size].item(), coords[i // size].item()
        return f"{z.flatten()[i]:.4f} at (a, b) = ({a:.2f}, {b:.2f})"

    print(
        f"trained {epochs} epochs with Adam; grid {size} x {size} over [-1, 1]^2 "
        f"({size**2} flat vectors)"
    )
    print(
        f"at the trained weights (a = b = 0): training loss {train_loss[center, center]:.4f}, "
        f"test loss {test_loss[center, center]:.4f}, test accuracy "
        f"{100 * test_acc[center, center]:.1f}%"
    )
    print(f"lowest on the grid: training loss {lowest(train_loss)}, test loss {lowest(test_loss)}")
    print(
        f"on the grid's border (|a| or |b| = 1): mean training loss {border(train_loss).mean():.3f}"
        f", mean test accuracy {100 * border(test_acc).mean():.1f}%"
    )
    print(f"figure: {os.path.relpath(figure)}")


if __name__ == "__main__":
    main()
