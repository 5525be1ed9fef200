"""A deep ensemble of small CNNs trained as one (P, N) parameter, with a learning-rate sweep.

Sixteen small convolutional networks on the bundled 8x8 digits, each from its own random
initialization (``fresh_flat_param(16)``: rows of one ``(16, num_params)`` tensor) and each with
its own learning rate (a ``(16, 1)`` tensor: a sweep in one run), are trained together: every
step is one population call ``r(x, flat_param=thetas)`` and one pure SGD-with-momentum step
``torchreparam.sgd`` whose hyperparameters broadcast per member. The script reports each
member's test accuracy against its learning rate, the accuracy and calibration error (ECE) of
the ensemble of the best half (chosen on a validation split) against its best single member,
and the wall time against training the same members one by one as plain modules. The best
member is checked out as a plain ``nn.Module`` (``member_module``) and saved by plain torch.

    python examples/deep_ensemble.py            # 16 members, 12 epochs (about a minute)
    python examples/deep_ensemble.py --quick    # 8 members, 3 epochs (about 15 s)

Needs scikit-learn and matplotlib. The figure (accuracy against learning rate, and a
reliability diagram) is saved to ``--out``.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

import torchreparam
from torchreparam import ReparamModule, member_module

ASSETS = Path(__file__).resolve().parents[1] / "docs" / "assets" / "examples"


def load_data() -> tuple[Tensor, ...]:
    """The digits as (1, 8, 8) images, standardized; train/validation/test 60/10/30."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(digits.target)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=0
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=1 / 7, stratify=y_rest, random_state=0
    )
    return x_train, y_train, x_val, y_val, x_test, y_test


def make_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )  # fmt: skip


def batches(n: int, size: int, epochs: int, gen: torch.Generator) -> list[Tensor]:
    """The same shuffled minibatches for every member (and for the one-by-one run)."""
    return [b for _ in range(epochs) for b in torch.randperm(n, generator=gen).split(size)]


def train_population(r: ReparamModule, thetas: Tensor, lr: Tensor, x: Tensor, y: Tensor,
                     order: list[Tensor]) -> Tensor:  # fmt: skip
    """Every member trained by SGD with momentum 0.9 at its own learning rate ``lr`` (P, 1)."""
    state = None
    for idx in order:
        thetas = thetas.detach().requires_grad_()
        logits = r(x[idx], flat_param=thetas, in_dims=(None,))  # (P, batch, 10)
        labels = y[idx].expand(logits.shape[:2])
        # The sum of the members' mean losses: its gradient holds each member's own.
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten()) * len(thetas)
        (grad,) = torch.autograd.grad(loss, thetas)
        thetas, state = torchreparam.sgd(thetas.detach(), grad, state, lr=lr, momentum=0.9)
    return thetas.detach()


def train_one_by_one(r: ReparamModule, thetas: Tensor, lr: Tensor, x: Tensor, y: Tensor,
                     order: list[Tensor]) -> Tensor:  # fmt: skip
    """The same members trained one after the other as plain modules by torch.optim.SGD."""
    trained = []
    for theta, rate in zip(thetas, lr[:, 0].tolist(), strict=True):
        plain = member_module(r, theta)
        opt = torch.optim.SGD(plain.parameters(), lr=rate, momentum=0.9)
        for idx in order:
            opt.zero_grad()
            F.cross_entropy(plain(x[idx]), y[idx]).backward()
            opt.step()
        trained.append(torchreparam.member_vector(r, plain))
    return torch.stack(trained)


@torch.no_grad()
def probabilities(r: ReparamModule, thetas: Tensor, x: Tensor) -> Tensor:
    """Every member's predicted class probabilities ``(P, examples, 10)``."""
    return r(x, flat_param=thetas, in_dims=(None,)).softmax(-1)


def ece(probs: Tensor, y: Tensor, bins: int = 10) -> tuple[float, Tensor, Tensor]:
    """Expected calibration error, and per confidence bin the accuracy and mean confidence."""
    conf, pred = probs.max(-1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    accs, confs, total = torch.full((bins,), float("nan")), torch.full((bins,), float("nan")), 0.0
    for b in range(bins):
        mask = (conf > edges[b]) & (conf <= edges[b + 1])
        if mask.any():
            accs[b], confs[b] = correct[mask].mean(), conf[mask].mean()
            total += mask.float().mean().item() * abs(accs[b].item() - confs[b].item())
    return total, accs, confs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    members, epochs = (8, 3) if args.quick else (16, 12)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x_train, y_train, x_val, y_val, x_test, y_test = load_data()

    r = ReparamModule(make_net())
    thetas = r.fresh_flat_param(members)  # (P, N): P independent initializations
    lr = torch.logspace(-2.5, -0.5, members).unsqueeze(1)  # (P, 1): the sweep
    order = batches(len(x_train), 64, epochs, gen)
    print(f"{members} CNNs of {r.param_numel:,} parameters, {len(order)} steps of 64 images")

    start = time.perf_counter()
    trained = train_population(r, thetas, lr, x_train, y_train, order)
    together = time.perf_counter() - start
    start = time.perf_counter()
    alone = train_one_by_one(r, thetas, lr, x_train, y_train, order)
    one_by_one = time.perf_counter() - start
    speedup = one_by_one / together
    agree = probabilities(r, trained, x_test).argmax(-1) == probabilities(r, alone, x_test).argmax(
        -1
    )
    print(
        f"trained together {together:.1f} s, one by one {one_by_one:.1f} s ({speedup:.1f}x); "
        f"the two agree on {agree.float().mean().item():.4f} of the members' test predictions"
    )  # (not all: float32 rounding differs, and training amplifies it, most where it diverges)

    val_acc = (probabilities(r, trained, x_val).argmax(-1) == y_val).float().mean(1)
    test_probs = probabilities(r, trained, x_test)  # (P, examples, 10)
    test_acc = (test_probs.argmax(-1) == y_test).float().mean(1)
    for rate, v, t in zip(lr[:, 0].tolist(), val_acc.tolist(), test_acc.tolist(), strict=True):
        print(f"  lr {rate:.4f}: validation {v:.3f}, test {t:.3f}")
    chosen = val_acc.argsort(descending=True)[: members // 2]  # the best half, on validation
    best = int(chosen[0])
    ensemble = test_probs[chosen].mean(0)
    ens_acc = (ensemble.argmax(-1) == y_test).float().mean().item()
    ens_ece, ens_bins, ens_conf = ece(ensemble, y_test)
    one_ece, one_bins, one_conf = ece(test_probs[best], y_test)
    print(
        f"result: ensemble of {len(chosen)} accuracy {ens_acc:.3f} ECE {ens_ece:.3f}; "
        f"best member accuracy {test_acc[best].item():.3f} ECE {one_ece:.3f}; "
        f"members mean accuracy {test_acc.mean().item():.3f}; "
        f"training {one_by_one / together:.1f}x faster together"
    )

    plain = member_module(r, trained[best])  # a plain nn.Sequential: torch alone loads it
    saved = io.BytesIO()
    torch.save(plain, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    same = torch.equal(loaded(x_test), r(x_test, flat_param=trained[best]))
    print(f"best member saved and loaded by plain torch as {type(loaded).__name__}: same {same}")
    args.out.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.semilogx(lr[:, 0], test_acc, "o", label="members")
    left.axhline(ens_acc, color="C1", label=f"ensemble of the best {len(chosen)}")
    left.set(xlabel="learning rate", ylabel="test accuracy", title="One population, one sweep")
    left.legend()
    right.plot([0, 1], [0, 1], "k:", label="calibrated")
    right.plot(ens_conf, ens_bins, "o-", label=f"ensemble (ECE {ens_ece:.3f})")
    right.plot(one_conf, one_bins, "s-", label=f"best member (ECE {one_ece:.3f})")
    right.set(xlabel="confidence", ylabel="accuracy", title="Reliability", xlim=(0, 1))
    right.legend()
    fig.tight_layout()
    figure = args.out / "deep_ensemble.png"
    fig.savefig(figure, dpi=100)
    print(f"figure: {figure}")


if __name__ == "__main__":
    main()
