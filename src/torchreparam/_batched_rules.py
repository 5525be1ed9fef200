"""How each layer runs for a whole population at once: the rules of the graph plan, in one place.

A *stacked* tensor holds every member's value on a new leading dimension ``(P, *member)``; a
*shared* one is the same for all members (an input without ``in_dims``, a buffer, a constant).
A module rule takes the module, its weights stacked ``(P, *shape)`` by name, its input and
whether that input is stacked, and returns the stacked output, or ``None`` where the input does
not fit (the loop then runs and raises the module's own error, if any). Each computes what the
loop of single calls computes, with the members folded into one kernel: ``baddbmm`` for
``Linear``, a grouped convolution for ``Conv1d``/``Conv2d``, members as channels for the norms,
members as batch rows for pooling.

The functions that forward code calls between layers have their rules in
:mod:`._batched_functions`; what has no rule runs under ``vmap``, one graph node at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._batched import defined_forward

__all__ = ["MODULES", "Stacked", "flatten_member", "module_rule", "shift"]

Weights = dict[str, Tensor | None]  # a module's weights by name, each (P, *shape) or None
ModuleRule = Callable[[nn.Module, Weights, Tensor, bool, int], "Tensor | None"]


class Stacked:
    """A value of the graph and whether it is stacked over the members."""

    __slots__ = ("stacked", "value")

    def __init__(self, value: Any, stacked: bool) -> None:
        self.value, self.stacked = value, stacked


# ---- modules ------------------------------------------------------------------------------
def _linear(module: nn.Module, w: Weights, x: Tensor, stacked: bool, p: int) -> Tensor | None:
    weight, bias = w["weight"], w["bias"]
    assert weight is not None
    features = weight.shape[2]
    if x.dim() < 1 + stacked or x.shape[-1] != features:
        return None
    lead = x.shape[1:-1] if stacked else x.shape[:-1]
    rows = x.reshape(p, -1, features) if stacked else x.reshape(1, -1, features).expand(p, -1, -1)
    wt = weight.transpose(1, 2)  # (P, in, out)
    out = torch.bmm(rows, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), rows, wt)
    return out.view(p, *lead, weight.shape[1])


def _conv(module: nn.Module, w: Weights, x: Tensor, stacked: bool, p: int) -> Tensor | None:
    """A grouped convolution: member ``i``'s channels are groups ``i*g .. (i+1)*g - 1``."""
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    weight, bias = w["weight"], w["bias"]
    assert weight is not None
    spatial = weight.dim() - 3
    member_dims = x.dim() - stacked
    if module.padding_mode != "zeros" or member_dims != spatial + 2:
        return None
    out_ch, groups = weight.shape[1], module.groups
    conv = F.conv1d if spatial == 1 else F.conv2d
    flat_w = weight.reshape(p * out_ch, *weight.shape[2:])
    flat_b = None if bias is None else bias.reshape(p * out_ch)
    args = (module.stride, module.padding, module.dilation)
    if stacked:  # (P, B, C, *sp) -> (B, P*C, *sp)
        batch = x.shape[1]
        folded = x.transpose(0, 1).reshape(batch, -1, *x.shape[3:])
        out = conv(folded, flat_w, flat_b, *args, groups * p)  # type: ignore[arg-type]
    elif groups == 1:  # a shared input: one convolution with every member's filters
        batch = x.shape[0]
        out = conv(x, flat_w, flat_b, *args, 1)  # type: ignore[arg-type]
    else:
        batch = x.shape[0]
        out = conv(x.repeat(1, p, *(1,) * spatial), flat_w, flat_b, *args, groups * p)  # type: ignore[arg-type]
    return out.view(batch, p, out_ch, *out.shape[2:]).transpose(0, 1)


def _members_as_channels(x: Tensor, stacked: bool, p: int) -> Tensor:
    """``(P, B, C, *sp)`` (or a shared ``(B, C, *sp)``) as ``(B, P*C, *sp)``."""
    if not stacked:
        x = x.unsqueeze(0).expand(p, *x.shape)
    return x.transpose(0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def _from_channels(out: Tensor, p: int) -> Tensor:
    return out.view(out.shape[0], p, -1, *out.shape[2:]).transpose(0, 1)


def _per_channel(value: Tensor | None, p: int, channels: int) -> Tensor | None:
    """A stacked ``(P, C)`` or shared ``(C,)`` per-channel tensor as ``(P*C,)``."""
    if value is None:
        return None
    return value.reshape(-1) if value.dim() == 2 else value.repeat(p)


def _batch_norm(module: nn.Module, w: Weights, x: Tensor, stacked: bool, p: int) -> Tensor | None:
    """Eval mode (running statistics); train mode with batch statistics, updating each
    member's own running statistics when they are given per member (``None`` otherwise)."""
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)
    member_dims = x.dim() - stacked
    if member_dims < 2 or x.shape[stacked + 1] != module.num_features:
        return None
    channels = module.num_features
    mean, var, count = w.get("running_mean"), w.get("running_var"), w.get("num_batches_tracked")
    factor = 0.0
    updates = module.training and module.track_running_stats
    if updates:
        if module.momentum is None or mean is None or var is None or count is None:
            return None  # (a cumulative average: each member's own count decides)
        if not all(t.dim() == 2 and t.is_contiguous() for t in (mean, var)) or count.dim() != 1:
            return None  # (shared statistics would be updated once: vmap or the loop)
        count.add_(1)
        factor = module.momentum
    out = F.batch_norm(
        _members_as_channels(x, stacked, p),
        _per_channel(mean, p, channels),  # (per member: a view, updated in place)
        _per_channel(var, p, channels),
        _per_channel(w["weight"], p, channels),
        _per_channel(w["bias"], p, channels),
        module.training or mean is None,
        factor,
        module.eps,
    )
    return _from_channels(out, p)


def _group_norm(module: nn.Module, w: Weights, x: Tensor, stacked: bool, p: int) -> Tensor | None:
    assert isinstance(module, nn.GroupNorm)
    if x.dim() - stacked < 2 or x.shape[stacked + 1] != module.num_channels:
        return None
    channels = module.num_channels
    out = F.group_norm(
        _members_as_channels(x, stacked, p),
        module.num_groups * p,
        _per_channel(w["weight"], p, channels),
        _per_channel(w["bias"], p, channels),
        module.eps,
    )
    return _from_channels(out, p)


def _layer_norm(module: nn.Module, w: Weights, x: Tensor, stacked: bool, p: int) -> Tensor | None:
    assert isinstance(module, nn.LayerNorm)
    shape = tuple(module.normalized_shape)
    if tuple(x.shape[len(x.shape) - len(shape) :]) != shape or x.dim() - stacked < len(shape):
        return None
    if not stacked:
        x = x.unsqueeze(0).expand(p, *x.shape)
    out = F.layer_norm(x, shape, None, None, module.eps)
    lift = (1,) * (out.dim() - 1 - len(shape))  # the member's leading dimensions
    weight, bias = w["weight"], w["bias"]
    if weight is not None:
        out = out * weight.view(p, *lift, *shape)
    if bias is not None:
        out = out + bias.view(p, *lift, *shape)
    return out


def _embedding(module: nn.Module, w: Weights, x: Tensor, stacked: bool, p: int) -> Tensor | None:
    """Member ``i`` reads rows ``i*num .. (i+1)*num - 1`` of all the members' tables."""
    assert isinstance(module, nn.Embedding)
    weight = w["weight"]
    assert weight is not None
    if x.is_floating_point() or x.is_complex():
        return None
    num = weight.shape[1]
    if not stacked:
        x = x.unsqueeze(0).expand(p, *x.shape)
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= num):
        return None  # (the loop raises the module's own error)
    offsets = torch.arange(p, device=x.device).view(p, *(1,) * (x.dim() - 1)) * num
    return F.embedding(x + offsets, weight.reshape(p * num, -1), sparse=module.sparse)


def _pool(module: nn.Module, w: Weights, x: Tensor, stacked: bool, p: int) -> Tensor | None:
    """Pooling acts on each channel alone: the members become rows of the batch (in the order
    the memory holds them: a grouped convolution's output is batch-major, folded without a
    copy); a shared input is pooled once."""
    spatial = 2 if "2d" in type(module).__name__ else 1
    member_dims = x.dim() - stacked
    if member_dims not in (spatial + 1, spatial + 2):
        return None
    forward = defined_forward(module)
    if not stacked:
        out = forward(module, x)
        return out.unsqueeze(0).expand(p, *out.shape)
    swap = x.dim() == spatial + 3 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous()
    if swap:  # (P, B, C, *sp) held as (B, P, C, *sp)
        x = x.transpose(0, 1)
    inner = x.shape[-(spatial + 1) :]
    out = forward(module, x.reshape(-1, *inner))
    out = out.view(*x.shape[: x.dim() - spatial - 1], *out.shape[1:])
    return out.transpose(0, 1) if swap else out


def _elementwise(module: nn.Module, w: Weights, x: Tensor, stacked: bool, p: int) -> Tensor | None:
    out = defined_forward(module)(module, x)
    return out if stacked else out.unsqueeze(0).expand(p, *out.shape)


def _flatten(module: nn.Module, w: Weights, x: Tensor, stacked: bool, p: int) -> Tensor | None:
    assert isinstance(module, nn.Flatten)
    if not stacked:
        x = x.unsqueeze(0).expand(p, *x.shape)
    out = flatten_member(x, module.start_dim, module.end_dim)
    return out


def flatten_member(x: Tensor, start: int, end: int) -> Tensor | None:
    dims = x.dim() - 1  # a member's
    start, end = start + dims if start < 0 else start, end + dims if end < 0 else end
    if not 0 <= start <= end < dims:
        return None
    return x.flatten(start + 1, end + 1)


def _softmax_module(
    module: nn.Module, w: Weights, x: Tensor, stacked: bool, p: int
) -> Tensor | None:
    dim = module.__dict__.get("dim")
    if not isinstance(dim, int):
        return None
    if not stacked:
        x = x.unsqueeze(0).expand(p, *x.shape)
    fn = F.softmax if isinstance(module, nn.Softmax) else F.log_softmax
    return fn(x, shift(dim, x.dim() - 1))


_ELEMENTWISE_MODULES = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
)  # fmt: skip
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)  # fmt: skip

# A rule per layer type, keyed by the class's ``forward`` (a subclass that keeps it counts).
MODULES: dict[Any, tuple[ModuleRule, tuple[str, ...]]] = {
    nn.Linear.forward: (_linear, ("weight", "bias")),
    nn.Conv1d.forward: (_conv, ("weight", "bias")),
    nn.Conv2d.forward: (_conv, ("weight", "bias")),
    nn.modules.batchnorm._BatchNorm.forward: (
        _batch_norm, ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    ),
    nn.GroupNorm.forward: (_group_norm, ("weight", "bias")),
    nn.LayerNorm.forward: (_layer_norm, ("weight", "bias")),
    nn.Embedding.forward: (_embedding, ("weight",)),
    nn.Flatten.forward: (_flatten, ()),
    nn.Softmax.forward: (_softmax_module, ()),
    nn.LogSoftmax.forward: (_softmax_module, ()),
    **{cls.forward: (_pool, ()) for cls in _POOLS},
    **{cls.forward: (_elementwise, ()) for cls in _ELEMENTWISE_MODULES},
}  # fmt: skip


def module_rule(module: nn.Module) -> tuple[ModuleRule, tuple[str, ...]] | None:
    """The rule for ``module`` in its current state, or ``None`` (its forward is traced
    through instead, or, for a layer that would need a rule, the plan is refused)."""
    found = MODULES.get(defined_forward(module))
    if found is None:
        return None
    state = module.__dict__
    if state.get("inplace"):
        return None  # (the loop would change a shared input once per member)
    if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p != 0:
        return None  # random: traced through, its F.dropout runs under vmap
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is None:
        return None  # (a cumulative average from each member's count: vmap or the loop)
    if isinstance(module, nn.Embedding) and (
        module.padding_idx is not None or module.max_norm is not None
    ):
        return None
    if isinstance(module, nn.AdaptiveMaxPool1d | nn.AdaptiveMaxPool2d) and module.return_indices:
        return None
    if isinstance(module, nn.MaxPool1d | nn.MaxPool2d) and module.return_indices:
        return None
    return found


def shift(dim: int, member_dims: int) -> int:
    """A member's dimension ``dim`` in the stacked tensor."""
    return dim + 1 if dim >= 0 else dim  # (negative: counted from the end, the same)
