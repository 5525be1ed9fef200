"""Shared models and guards. References are always the unwrapped twin (a deepcopy taken before
wrapping) called plainly or through ``torch.func.functional_call``."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from torchreparam import ReparamModule


class Tied(nn.Module):
    """Embedding and output projection sharing one weight (as GPT-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mid(self.emb(idx))))


class KwModel(nn.Module):
    """A forward with keyword inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x: Tensor, *, scale: float = 1.0, shift: Tensor | None = None) -> Tensor:
        y = self.lin(x) * scale
        return y if shift is None else y + shift


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def convbn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    )


def shared_layer() -> nn.Module:
    lin = nn.Linear(5, 5)
    return nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(5, 2))


# name -> (factory, example input factory)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Any, ...]]]] = {
    "mlp": (mlp, lambda: (torch.randn(4, 5),)),
    "convbn": (convbn, lambda: (torch.randn(2, 3, 5, 5),)),
    "tied": (Tied, lambda: (torch.randint(0, 10, (4, 3)),)),
    "shared_layer": (shared_layer, lambda: (torch.randn(4, 5),)),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def build(
    name: str, dtype: torch.dtype = torch.float32
) -> tuple[ReparamModule, nn.Module, tuple[Any, ...]]:
    """(wrapper, unwrapped twin, example inputs) for model ``name``."""
    factory, inputs = MODELS[name]
    net = factory().to(dtype)
    twin = copy.deepcopy(net)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in inputs())
    return ReparamModule(net), twin, args


def reference(twin: nn.Module, layout: Any, theta: Tensor, args: tuple[Any, ...], **kw: Any) -> Any:
    """``twin`` called through ``torch.func.functional_call`` with ``theta``'s views."""
    return torch.func.functional_call(twin, layout.unflatten(theta), args, kw)


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(before: dict[str, Tensor], after: dict[str, Tensor]) -> None:
    assert list(before) == list(after)
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), key


@contextmanager
def unchanged(r: ReparamModule, *args: Any) -> Iterator[None]:
    """Assert that the block leaves ``r`` exactly as it was: same flat_param object, state dicts
    bit-identical, no binding left behind, and outputs equal to a twin copied before it."""
    twin = copy.deepcopy(r)
    flat = r.flat_param
    state, inner_state = snapshot(r), snapshot(r.module)
    yield
    assert r.flat_param is flat
    assert_same_state(state, snapshot(r))
    assert_same_state(inner_state, snapshot(r.module))
    from torchreparam._inject import innermost

    assert innermost(r._core) is None
    if args:
        with torch.no_grad():
            assert torch.equal(r(*args), twin(*args))
            assert torch.equal(r.module(*args), twin.module(*args))
