"""Every peer prepared over one model, and the contenders of the forward and backward rows.

Each peer gets its own copy of the model (all built from the same seed, so the weights are
equal): wrapping takes a model over, and ``vector_to_parameters`` writes into its module.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from torchreparam import ReparamModule

from .models import Model, loss_of
from .original import OriginalReparamModule

try:  # optional peer: its rows say "not installed" when it is absent
    import higher
except ImportError:
    higher = None

__all__ = ["NotInstalled", "Peers", "backward_contenders", "forward_contenders", "optional"]

Contenders = dict[str, Callable[[], object]]

PLAIN = "plain module, own weights"
OURS = "torchreparam, flat_param=theta"
ORIGINAL = "original torchreparam"
FUNC_FLAT = "functional_call, dict from the flat vector"
FUNC_PREBUILT = "functional_call, prebuilt dict"
HIGHER = "higher.monkeypatch, params from the flat vector"
V2P = "vector_to_parameters, then the module"
TORCHOPT = "torchopt.nn.reparametrize, dict from the flat vector"


class NotInstalled(Exception):
    """Raised by the stand-in of an optional peer that is not installed."""


def optional(package: str) -> Any:
    """The optional peer ``package``, imported; :class:`NotInstalled` when it is absent."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise NotInstalled(f"{package} is not installed") from None


def _missing(package: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        raise NotInstalled(f"{package} is not installed")

    return call


@dataclass
class Peers:
    """One model prepared for every peer, and ``theta``: another flat vector for it."""

    model: Model
    plain: nn.Module = field(init=False)
    ours: ReparamModule = field(init=False)
    original: OriginalReparamModule = field(init=False)
    func_net: nn.Module = field(init=False)
    v2p_net: nn.Module = field(init=False)
    theta: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.plain = self.model.build()
        self.func_net, self.v2p_net = self.copy(), self.copy()
        self.ours = ReparamModule(self.copy())
        self.original = OriginalReparamModule(self.copy())
        named = dict(self.plain.named_parameters())
        self.names = tuple(named)
        self.sizes = [p.numel() for p in named.values()]
        self.shapes = [p.shape for p in named.values()]
        gen = torch.Generator().manual_seed(6)
        flat = self.ours.flat_param.detach()
        self.theta = flat + 0.01 * torch.randn(flat.shape, generator=gen).to(flat)

    def copy(self) -> nn.Module:
        """A fresh copy of the (unwrapped) model: faster than building it again."""
        return copy.deepcopy(self.plain)

    def views(self, flat: Tensor) -> list[Tensor]:
        """``split`` + ``.view``: how a user turns a flat vector into parameters without us."""
        return [t.view(s) for t, s in zip(flat.split(self.sizes), self.shapes, strict=True)]

    def dict_from(self, flat: Tensor) -> dict[str, Tensor]:
        """``{name: view}`` of ``flat`` for ``functional_call``."""
        return dict(zip(self.names, self.views(flat), strict=True))

    def higher_model(self) -> Any:
        """``higher.monkeypatch`` over a fresh copy of the model; without higher, a stand-in
        whose calls raise :class:`NotInstalled` (its rows then say so)."""
        if higher is None:
            return _missing("higher")
        return higher.monkeypatch(self.copy(), copy_initial_weights=True)

    def torchopt_call(self) -> Callable[..., Any]:
        """``call(flat, *inputs)``: a fresh copy of the model called under
        ``torchopt.nn.reparametrize`` with the views of ``flat``; without torchopt, a
        stand-in that raises :class:`NotInstalled`."""
        try:
            reparametrize = optional("torchopt").nn.reparametrize
        except NotInstalled:
            return _missing("torchopt")
        net = self.copy()

        def call(flat: Tensor, *inputs: Tensor) -> object:
            with reparametrize(net, self.dict_from(flat)):
                return net(*inputs)

        return call


def forward_contenders(p: Peers) -> Contenders:
    """Forward calls with ``p.theta`` (and the plain module with its own weights)."""
    x, theta = p.model.inputs, p.theta
    prebuilt = p.dict_from(theta)
    fmodel = p.higher_model()
    torchopt_call = p.torchopt_call()
    params = list(p.v2p_net.parameters())

    def v2p() -> object:
        vector_to_parameters(theta, params)
        return p.v2p_net(*x)

    return {
        PLAIN: lambda: p.plain(*x),
        OURS: lambda: p.ours(*x, flat_param=theta),
        "torchreparam, own weights": lambda: p.ours(*x),
        ORIGINAL: lambda: p.original(*x, flat_param=theta),
        FUNC_FLAT: lambda: functional_call(p.func_net, p.dict_from(theta), x),
        FUNC_PREBUILT: lambda: functional_call(p.func_net, prebuilt, x),
        V2P: v2p,
        HIGHER: lambda: fmodel(*x, params=p.views(theta)),
        TORCHOPT: lambda: torchopt_call(theta, *x),
    }


def backward_contenders(p: Peers) -> Contenders:
    """Forward, loss and the gradient to ``theta`` (the plain module: to its own parameters)."""
    x, y = p.model.inputs, p.model.target
    theta = p.theta.detach().requires_grad_()
    own = list(p.plain.parameters())
    fmodel = p.higher_model()
    torchopt_call = p.torchopt_call()
    params = list(p.v2p_net.parameters())

    def grad(output: object, wrt: Any) -> tuple[Tensor, ...]:
        return torch.autograd.grad(loss_of(output, y), wrt)

    def v2p() -> Tensor:
        vector_to_parameters(theta.detach(), params)
        return parameters_to_vector(grad(p.v2p_net(*x), params))

    return {
        PLAIN: lambda: grad(p.plain(*x), own),
        OURS: lambda: grad(p.ours(*x, flat_param=theta), theta),
        ORIGINAL: lambda: grad(p.original(*x, flat_param=theta), theta),
        FUNC_FLAT: lambda: grad(functional_call(p.func_net, p.dict_from(theta), x), theta),
        V2P: v2p,
        HIGHER: lambda: grad(fmodel(*x, params=p.views(theta)), theta),
        TORCHOPT: lambda: grad(torchopt_call(theta, *x), theta),
    }
