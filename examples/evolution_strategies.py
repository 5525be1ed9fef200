"""Evolution strategies on scikit-learn's digits: a population of flat vectors, evaluated at once.

OpenAI-style ES (Salimans et al., 2017): each generation perturbs the flat parameter vector of
a small MLP with antithetic Gaussian noise, evaluates the whole population with one call
``r(x, flat_param=thetas)`` (``thetas`` is ``(population, num_params)``), turns the fitnesses
into centered ranks and steps Adam along the resulting gradient estimate. No backpropagation.

    python examples/evolution_strategies.py                # full run: 300 generations
    python examples/evolution_strategies.py --quick        # 100: well under a minute
    torchrun --standalone --nproc-per-node 2 examples/evolution_strategies.py --quick

Under ``torchrun`` every process draws the same noise (same seed) and evaluates its share of
the population with :func:`torchreparam.evaluate_population`, which gathers all the
fitnesses to every process; all processes then take the same step, so they stay identical.
Needs scikit-learn, matplotlib and tqdm. The fitness curve is saved to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from tqdm import tqdm

from torchreparam import ReparamModule, evaluate_population


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer generations (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--generations", type=int, default=None, help="default 300, quick 100")
    parser.add_argument("--pairs", type=int, default=50, help="antithetic pairs per generation")
    parser.add_argument("--sigma", type=float, default=0.05, help="noise scale")
    parser.add_argument("--lr", type=float, default=0.03, help="Adam learning rate")
    parser.add_argument("--batch", type=int, default=256, help="examples per generation")
    return parser.parse_args()


def load_data(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits (8x8 images, 10 classes): 80% train, 20% test, pixels in [0, 1] centered."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x / 16.0, y, test_size=0.2, random_state=seed, stratify=y
    )
    mean = x_train.mean(axis=0)
    as_x = lambda a: torch.tensor(a - mean, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def centered_ranks(fitness: Tensor) -> Tensor:
    """Fitnesses replaced by their ranks, scaled to [-0.5, 0.5]: robust to the loss's scale."""
    ranks = torch.empty_like(fitness)
    ranks[fitness.argsort()] = torch.arange(len(fitness), dtype=fitness.dtype)
    return ranks / (len(fitness) - 1) - 0.5


def accuracy(r: ReparamModule, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (r(x).argmax(dim=1) == y).float().mean().item()


def main() -> None:
    args = parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # launched by torchrun: MASTER_ADDR, RANK, ... are in the environment
        dist.init_process_group("gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    rank = dist.get_rank() if world > 1 else 0
    generations = args.generations or (100 if args.quick else 300)

    torch.manual_seed(args.seed)  # the same initial weights and noise in every process
    x_train, y_train, x_test, y_test = load_data(args.seed)
    net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    r = ReparamModule(net)
    optimizer = torch.optim.Adam(r.parameters(), lr=args.lr)  # r.parameters() is flat_param
    noise = torch.Generator().manual_seed(args.seed)

    def fitness(thetas: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Minus the cross-entropy of each row of ``thetas`` on (x, y): ``(rows,)``."""
        logits = r(x, flat_param=thetas)  # (rows, batch, 10): the whole block in one call
        losses = F.cross_entropy(
            logits.transpose(1, 2), y.expand(len(thetas), -1), reduction="none"
        )
        return -losses.mean(dim=1)

    history: dict[str, list[float]] = {"mean": [], "best": [], "center": []}
    accuracies: list[tuple[int, float, float]] = []  # (generation, train, test), now and then
    every = max(1, generations // 50)
    start = time.perf_counter()
    if rank == 0:
        print(
            f"MLP 64-32-10: {r.param_numel:,} parameters in one flat vector; population "
            f"{2 * args.pairs} ({args.pairs} antithetic pairs) on {world} process(es)"
        )
    bar = tqdm(range(generations), desc="ES", disable=None if rank == 0 else True)
    for generation in bar:
        if generation % every == 0:
            accuracies.append(
                (generation, accuracy(r, x_train, y_train), accuracy(r, x_test, y_test))
            )
        batch = torch.randint(len(x_train), (args.batch,), generator=noise)
        xb, yb = x_train[batch], y_train[batch]
        eps = torch.randn(args.pairs, r.param_numel, generator=noise)
        with torch.no_grad():
            center = r.flat_param.detach()
            thetas = torch.cat([center + args.sigma * eps, center - args.sigma * eps])
            # Each process evaluates its share of the rows; every process gets all fitnesses.
            scores = evaluate_population(partial(fitness, x=xb, y=yb), thetas)
            history["center"].append(fitness(center[None], xb, yb).item())
        weights = centered_ranks(scores)
        grad = (weights[: args.pairs] - weights[args.pairs :]) @ eps / (2 * args.pairs * args.sigma)
        r.flat_param.grad = -grad  # ascend the fitness: the optimizer descends
        optimizer.step()
        history["mean"].append(scores.mean().item())
        history["best"].append(scores.max().item())
    seconds = time.perf_counter() - start

    train_acc, test_acc = accuracy(r, x_train, y_train), accuracy(r, x_test, y_test)
    accuracies.append((generations, train_acc, test_acc))
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        png = args.out / "es_fitness.png"
        plot(history, accuracies, png)
        print(
            f"result: train accuracy {train_acc:.3f}, test accuracy {test_acc:.3f} (chance 0.100) "
            f"after {generations} generations of {2 * args.pairs} members "
            f"({r.param_numel} parameters) on {world} process(es) in {seconds:.1f} s"
        )
        print(f"figure: {png}")
    if world > 1:
        dist.barrier()  # rank 0 plots first: tear gloo down together (a rank leaving early can
        dist.destroy_process_group()  # abort the other's transport threads under load)


def plot(
    history: dict[str, list[float]], accuracies: list[tuple[int, float, float]], path: Path
) -> None:
    """Left: the fitness curve (on each generation's batch); right: accuracy of the center."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = range(1, len(history["mean"]) + 1)
    left.plot(steps, history["best"], label="best member", alpha=0.6)
    left.plot(steps, history["mean"], label="population mean")
    left.plot(steps, history["center"], label="center (the trained vector)")
    left.set(xlabel="generation", ylabel="fitness (minus cross-entropy)", title="fitness")
    left.legend()
    at, train, test = zip(*accuracies, strict=True)
    right.plot(at, train, label="train")
    right.plot(at, test, label="test (held out)")
    right.axhline(0.1, color="gray", linestyle=":", label="chance")
    right.set(xlabel="generation", ylabel="accuracy", ylim=(0, 1.02))
    right.set_title(f"accuracy of the center: test {test[-1]:.3f}")
    right.legend()
    fig.suptitle("Evolution strategies on digits: a population of flat vectors per generation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
