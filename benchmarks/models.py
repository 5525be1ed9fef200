"""The benchmark models, each with an example batch: plain ``torch.nn``, built offline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchreparam import _resnet  # the one private import: the demo's ResNet-18 (see __init__)

__all__ = ["Model", "conv4", "deep_linear", "loss_of", "mlp", "resnet", "seeded"]


@dataclass(frozen=True)
class Model:
    """A model factory with its example batch.

    Attributes:
        name: how the tables call it.
        build: a fresh model (call it once per contender: wrapping takes a model over).
        inputs: the positional inputs of one call.
        target: class labels for a cross-entropy loss.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: tuple[Tensor, ...]
    target: Tensor


def loss_of(output: object, target: Tensor) -> Tensor:
    """Cross-entropy of a model output (a tensor, or a Hugging Face output's ``logits``)."""
    logits = output if isinstance(output, Tensor) else output.logits  # type: ignore[attr-defined]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def seeded(factory: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    """``factory`` with the random seed set first, so every copy gets equal weights."""

    def build() -> nn.Module:
        torch.manual_seed(seed)
        return factory()

    return build


def mlp(batch: int = 32) -> Model:
    """The latency-bound MLP 16-32-32-4 (1,764 parameters in 6 tensors), batch 32."""

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
        )

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 16, generator=gen)
    return Model(
        "MLP 16-32-32-4", seeded(build), (x,), torch.randint(0, 4, (batch,), generator=gen)
    )


def deep_linear(tensors: int, width: int = 4, batch: int = 4) -> Model:
    """``tensors // 2`` tiny ``Linear(width, width)`` layers: overhead per tensor dominates."""

    def build() -> nn.Module:
        return nn.Sequential(*(nn.Linear(width, width) for _ in range(tensors // 2)))

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, width, generator=gen)
    y = torch.randint(0, width, (batch,), generator=gen)
    return Model(f"{tensors // 2} x Linear({width}, {width})", seeded(build), (x,), y)


def _conv_block(cin: int, cout: int) -> nn.Module:
    # Batch statistics in every mode and no running buffers, as few-shot code does (MAML).
    bn = nn.BatchNorm2d(cout, track_running_stats=False)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), bn, nn.ReLU(), nn.MaxPool2d(2))


def conv4(batch: int = 25, ways: int = 5) -> Model:
    """The 4-block conv net of few-shot learning on 28x28 images (Omniglot): conv3x3-64,
    BatchNorm, ReLU, max-pool, then a linear head; batch 25 is 5-way 5-shot."""

    def build() -> nn.Module:
        blocks = [_conv_block(1 if i == 0 else 64, 64) for i in range(4)]
        return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(64, ways))

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, ways, (batch,), generator=gen)
    return Model("4-block conv net, 28x28", seeded(build), (x,), y)


def resnet(image: int = 112, batch: int = 2) -> Model:
    """ResNet-18 (torchvision's when it imports, else the ``torch.nn`` one), train mode."""
    source = "torchvision" if _resnet.torchvision is not None else "torch.nn"

    def build() -> nn.Module:
        return _resnet.resnet18()[0]

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(batch, 3, image, image, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)
    name = f"ResNet-18 ({source}), {batch}x3x{image}x{image}"
    return Model(name, seeded(build), (x,), y)
