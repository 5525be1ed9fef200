"""How the functions that forward code calls between layers run for a whole population.

Stacked tensors hold every member's value on a leading dimension ``(P, *member)``, shared ones
are the same for all members (see :mod:`._batched_rules`). A rule takes the function, its
arguments, keyword arguments and which arguments are stacked, and returns the stacked result
or ``NotImplemented`` (the node then runs under ``vmap``, alone). Elementwise arithmetic and
activations run on the stacked tensors with the members' dimensions aligned first; shape
queries and reshapes are answered per member; reductions and softmax over a member's dimension
are shifted by one; matrix products and attention broadcast over stacked operands.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._batched_rules import flatten_member, shift

__all__ = ["FUNCTIONS", "METHODS"]


def _aligned(args: tuple[Any, ...], stacked: tuple[bool, ...]) -> tuple[Any, ...]:
    """Stacked operands padded to one member rank, so that broadcasting aligns members."""
    ranks = [a.dim() - s for a, s in zip(args, stacked, strict=True) if isinstance(a, Tensor)]
    top = max(ranks, default=0)
    out = []
    for a, s in zip(args, stacked, strict=True):
        if isinstance(a, Tensor) and s and a.dim() - 1 < top:
            a = a.view(a.shape[0], *(1,) * (top - a.dim() + 1), *a.shape[1:])
        out.append(a)
    return tuple(out)


_ELEMENTWISE_FUNCTIONS = frozenset(
    [
        operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
        operator.iadd, operator.isub, operator.imul, operator.itruediv,
        torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.exp, torch.tanh,
        torch.sigmoid, torch.relu, torch.sqrt, torch.rsqrt, torch.abs, torch.where,
        F.relu, F.gelu, F.silu, F.elu, F.leaky_relu, F.softplus, F.tanh, F.sigmoid, F.mish,
        F.hardswish, F.relu6,
    ]
)  # fmt: skip
_ELEMENTWISE_METHODS = frozenset(
    [
        "add", "sub", "mul", "div", "neg", "exp", "tanh", "sigmoid", "relu", "sqrt", "rsqrt",
        "abs", "pow", "add_", "mul_", "sub_", "div_", "relu_", "contiguous", "float", "to",
        "type_as",
    ]
)  # fmt: skip
_INPLACE = frozenset(
    [operator.iadd, operator.isub, operator.imul, operator.itruediv, "add_", "mul_", "sub_",
     "div_", "relu_"]
)  # fmt: skip

FunctionRule = Callable[[Any, tuple[Any, ...], dict[str, Any], tuple[bool, ...]], Any]


def _elementwise_call(
    fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], st: tuple[bool, ...]
) -> Any:
    if any(isinstance(v, Tensor) for v in kwargs.values()) or kwargs.get("inplace"):
        return NotImplemented
    if fn in _INPLACE and not st[0]:
        return NotImplemented  # (a shared value changed in place: once, not once per member)
    aligned = _aligned(args, st)
    return (
        fn(*aligned, **kwargs)
        if not isinstance(fn, str)
        else getattr(aligned[0], fn)(*aligned[1:], **kwargs)
    )


def _member_shape(x: Tensor) -> torch.Size:
    return x.shape[1:]


def _reshape(x: Tensor, shape: tuple[Any, ...]) -> Tensor:
    if len(shape) == 1 and isinstance(shape[0], tuple | list | torch.Size):
        shape = tuple(shape[0])
    return x.reshape(x.shape[0], *shape)


def _method(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], st: tuple[bool, ...]) -> Any:
    """Methods of a stacked tensor that have a rule (``NotImplemented``: none)."""
    x = args[0]
    if not st[0] or any(st[1:]):
        return NotImplemented
    member = x.dim() - 1
    if name == "size":
        return (
            _member_shape(x)
            if len(args) == 1 and not kwargs
            else _member_shape(x)[args[1] if len(args) > 1 else kwargs["dim"]]
        )
    if name == "dim":
        return member
    if name in ("view", "reshape") and not kwargs:
        return _reshape(x, args[1:])
    if name == "flatten":
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        out = flatten_member(x, start, end)
        return NotImplemented if out is None else out
    if name in ("transpose", "swapaxes") and not kwargs and len(args) == 3:
        return x.transpose(shift(args[1], member), shift(args[2], member))
    if name == "permute" and not kwargs:
        dims = args[1] if len(args) == 2 and isinstance(args[1], tuple | list) else args[1:]
        return x.permute(0, *(shift(d, member) for d in dims))
    return NotImplemented


def _reduce(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], st: tuple[bool, ...]) -> Any:
    """Softmax, sums and means over a member's dimension(s): shifted by one."""
    if not st[0] or any(st[1:]):
        return NotImplemented
    x, member = args[0], args[0].dim() - 1
    rest = dict(kwargs)
    dim = args[1] if len(args) > 1 else rest.pop("dim", None)
    if dim is None or len(args) > 2:
        return NotImplemented
    rest.pop("dim", None)
    dims = (
        tuple(shift(d, member) for d in dim)
        if isinstance(dim, tuple | list)
        else shift(dim, member)
    )
    return fn(x, dims, **rest)


def _matmul(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], st: tuple[bool, ...]) -> Any:
    """Matrix products and attention: stacked operands of two or more dimensions per member
    broadcast as batched matrices (shared ones too, when no more than a member's rank)."""
    tensors = [(a, s) for a, s in zip(args, st, strict=True) if isinstance(a, Tensor)]
    if any(isinstance(v, Tensor) for v in kwargs.values()) or len(tensors) != len(args):
        return NotImplemented
    if any(a.dim() - s < 2 for a, s in tensors):
        return NotImplemented
    aligned = _aligned(args, st)
    top = max(a.dim() for a in aligned if isinstance(a, Tensor))
    if any(not s and a.dim() >= top for a, s in tensors):
        return NotImplemented
    return fn(*aligned, **kwargs)


def _getattr(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], st: tuple[bool, ...]) -> Any:
    """``x.shape``, ``x.ndim`` (per member), ``x.dtype``, ``x.device`` of a stacked tensor."""
    x, name = args[0], args[1]
    if not isinstance(x, Tensor) or kwargs or len(args) != 2:
        return NotImplemented
    if name == "shape":
        return x.shape[1:]
    if name == "ndim":
        return x.dim() - 1
    if name in ("dtype", "device", "is_cuda", "requires_grad", "layout"):
        return getattr(x, name)
    return NotImplemented


FUNCTIONS: dict[Any, FunctionRule] = {
    getattr: _getattr,
    **{fn: _elementwise_call for fn in _ELEMENTWISE_FUNCTIONS},
    F.softmax: _reduce, F.log_softmax: _reduce, torch.softmax: _reduce, torch.sum: _reduce,
    torch.mean: _reduce, torch.matmul: _matmul, operator.matmul: _matmul,
    F.scaled_dot_product_attention: _matmul,
    torch.flatten: lambda fn, a, k, s: _method("flatten", a, k, s),
}  # fmt: skip
METHODS: dict[str, FunctionRule] = {
    **{name: lambda fn, a, k, s: _elementwise_call(fn, a, k, s) for name in _ELEMENTWISE_METHODS},
    **{
        name: lambda fn, a, k, s: _method(fn, a, k, s)
        for name in ("size", "dim", "view", "reshape", "flatten", "transpose", "permute")
    },
    "softmax": lambda fn, a, k, s: _reduce(lambda x, d, **kw: x.softmax(d, **kw), a, k, s),
    "sum": lambda fn, a, k, s: _reduce(lambda x, d, **kw: x.sum(d, **kw), a, k, s),
    "mean": lambda fn, a, k, s: _reduce(lambda x, d, **kw: x.mean(d, **kw), a, k, s),
}
