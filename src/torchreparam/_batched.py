"""A population of a multilayer perceptron without ``vmap``: batched matrix products.

For a module tree that is a ``Sequential`` (nested ones too) of ``Linear`` layers, elementwise
activations, ``Flatten`` and inactive ``Dropout``, a population call is a few batched kernels
over the ``(population, *shape)`` slices of the vectors: ``baddbmm`` for each ``Linear``, the
activation on the stacked tensor. That is what ``vmap`` computes there, without its per-op
dispatch. Anything else (hooks, buffers, another ``forward``, a parametrized or frozen weight)
gets no plan and takes ``vmap`` or the loop; an input that does not fit (shape, dtype, device)
takes the loop, which raises the module's own error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from ._layout import FlatLayout

__all__ = ["Plan", "plan", "run"]

# Modules that act on each element alone: the same on a stacked (population, ...) tensor.
_ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)  # fmt: skip
_FORWARDS = frozenset(cls.forward for cls in (*_ELEMENTWISE, nn.Flatten))
_GLOBAL_HOOKS = (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
    "_global_backward_pre_hooks",
)  # fmt: skip

# A step: a Linear as (weight entry, bias entry or -1, in_features, None), any other module
# as (-1, -1, 0, module).
_Step = tuple[int, int, int, "nn.Module | None"]
# What a plan assumed of each module it visited: (module, training, children, Dropout's p or
# None).
_Seen = tuple[nn.Module, bool, tuple[nn.Module | None, ...], Any]


class Plan:
    """The steps of one module tree, and what they assumed of it (rechecked before each use:
    modes, hooks, children)."""

    __slots__ = ("root", "seen", "steps")

    def __init__(self, root: nn.Module, steps: tuple[_Step, ...], seen: tuple[_Seen, ...]):
        self.root, self.steps, self.seen = root, steps, seen

    def holds(self, root: nn.Module) -> bool:
        """Whether the steps still describe ``root`` (cheap: no walk of the tree)."""
        if root is not self.root or _global_hooks():
            return False
        for module, training, children, p in self.seen:
            if (
                module.training is not training
                or _hooked(module)
                or tuple(module._modules.values()) != children
                or (p is not None and module.__dict__.get("p") != p)
            ):
                return False
        return True


def plan(module: nn.Module, layout: FlatLayout, memo: dict[str, Any]) -> Plan | None:
    """The batched steps of ``module``, or ``None`` if it is not such a tree; ``memo`` keeps the
    last plan, reused while it holds."""
    cached = memo.get("batched")
    if cached is not None and cached.holds(module):
        return cached
    if _global_hooks():
        return None
    steps: list[_Step] = []
    seen: list[_Seen] = []
    if not _walk(module, "", layout, steps, seen) or all(s[3] is not None for s in steps):
        return None  # (not such a tree, or no Linear in it)
    memo["batched"] = made = Plan(module, tuple(steps), tuple(seen))
    return made


def _global_hooks() -> bool:
    return any(getattr(_module_globals, name, None) for name in _GLOBAL_HOOKS)


def _hooked(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _walk(
    module: nn.Module, prefix: str, layout: FlatLayout, steps: list[_Step], seen: list[_Seen]
) -> bool:
    if _hooked(module):
        return False
    forward = type(module).forward
    p = module.__dict__.get("p") if forward is nn.Dropout.forward else None  # (a float)
    seen.append((module, module.training, tuple(module._modules.values()), p))
    if forward is nn.Sequential.forward:
        return all(  # every child, in order: one used twice runs twice (named_children dedups)
            child is not None and _walk(child, f"{prefix}{name}.", layout, steps, seen)
            for name, child in module._modules.items()
        )
    if forward is nn.Linear.forward:
        weight, bias = f"{prefix}weight", f"{prefix}bias"
        if weight not in layout or len(layout[weight].shape) != 2:
            return False  # (a parametrized or frozen weight: not a slice of the vector)
        if bias not in layout and getattr(module, "bias", None) is not None:
            return False
        at = layout.position
        steps.append(
            (at(weight), at(bias) if bias in layout else -1, layout[weight].shape[1], None)
        )
        return True
    if module._parameters or module._buffers or module._modules:
        return False
    dropout = forward is nn.Dropout.forward
    plain = (not module.training or p == 0) if dropout else forward in _FORWARDS
    if plain:
        steps.append((-1, -1, 0, module))
    return plain


def run(made: Plan, rows: Sequence[Tensor], x: Tensor, batched: bool) -> Tensor | None:
    """The population's output ``(population, *out)``, or ``None`` when ``x`` does not fit
    (the loop then runs, and raises the module's own error if there is one).

    Between ``Linear`` layers the activations stay feature-major, ``(population, features,
    rows)``: ``W @ h`` runs about 1.7x faster here than ``h @ W.T`` with batched kernels.

    Args:
        rows: the ``(population, *shape)`` slices of the vectors, one per layout entry.
        batched: whether ``x`` has a leading population dimension (else it is shared).
    """
    first = rows[0]
    if x.dtype != first.dtype or x.device != first.device or x.layout != torch.strided:
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None  # (autocast casts F.linear and bmm by different lists)
    population = first.shape[0]
    lead: tuple[int, ...] | None = None  # set while x is feature-major: a member's lead dims
    for w_at, b_at, in_features, module in made.steps:
        if module is not None:
            if not batched or type(module) is not nn.Flatten:
                x = type(module).forward(module, x)  # (no hooks anywhere: the plan holds)
                continue
            if lead is not None:
                x, lead = x.transpose(1, 2).reshape(population, *lead, x.shape[1]), None
            x = _flatten(module, x)  # type: ignore[assignment]
            if x is None:
                return None
            continue
        if lead is None:  # to feature-major
            shape = x.shape
            if len(shape) <= batched or shape[-1] != in_features:
                return None
            if batched:
                lead = shape[1:-1]
                x = x.reshape(population, -1, in_features).transpose(1, 2)
            else:  # shared input: every member reads the same one
                lead = shape[:-1]
                x = x.reshape(-1, in_features).t().expand(population, -1, -1)
                batched = True
        elif x.shape[1] != in_features:
            return None
        weight = rows[w_at]
        x = torch.bmm(weight, x) if b_at < 0 else torch.baddbmm(rows[b_at].unsqueeze(2), weight, x)
    if lead is None:
        return x if batched else None
    return x.transpose(1, 2).reshape(population, *lead, x.shape[1])


def _flatten(module: nn.Flatten, x: Tensor) -> Tensor | None:
    """``Flatten`` of each member of a stacked ``x``: its dimensions shifted by one."""
    dims = x.dim() - 1  # a member's
    start, end = module.start_dim, module.end_dim
    start, end = start + dims if start < 0 else start, end + dims if end < 0 else end
    if not 0 <= start <= end < dims:
        return None
    return x.flatten(start + 1, end + 1)
