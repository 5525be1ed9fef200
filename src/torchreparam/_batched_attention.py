"""``nn.MultiheadAttention`` for a whole population at once: the graph plan's attention rule.

What ``F.multi_head_attention_forward`` computes for one member, with the members on a leading
dimension: every member's query, key and value brought to ``(P, batch, sequence, features)``
(a shared input stays one tensor, projected by one matrix product with every member's weights
side by side), heads as a dimension ``(P, batch, heads, sequence, head_dim)``, the masks made
additive as torch makes them (``True``: ``-inf``) and broadcast over the members, then
``scaled_dot_product_attention`` (``need_weights=False``) or the explicit softmax the module
writes out when it returns the weights, and the output projection as one ``baddbmm``.

Covered: ``batch_first`` or not, unbatched inputs, ``key_padding_mask`` and ``attn_mask``
(boolean or additive, 2-D or per head), ``is_causal``, ``need_weights`` with or without
``average_attn_weights``, ``add_bias_kv``, ``add_zero_attn``, ``kdim``/``vdim``, shared or
per-member inputs and masks. Dropout in train mode draws random numbers: refused at planning
(``vmap`` or the loop run it). An input the rule does not fit (shapes, dtypes, mixed mask
kinds) gives ``None``: the loop runs and raises the module's own error, if any.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._batched import defined_forward
from ._batched_rules import Stacked

__all__ = ["CALL_RULES", "call_rule", "no_rule_reason", "outputs"]

Weights = dict[str, Tensor | None]
# A rule for a module called with several inputs: the module, its stacked weights by name, its
# positional and keyword inputs (stacked or shared), the population; the output or None.
CallRule = Callable[
    [nn.Module, Weights, tuple[Stacked, ...], dict[str, Stacked], int], "Stacked | None"
]
_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_NAMES = (
    "in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
    "bias_k", "bias_v", "out_proj.weight", "out_proj.bias",
)  # fmt: skip


def _leading(s: Stacked) -> Tensor:
    """A stacked ``(P, *member)`` tensor as it is, a shared one as ``(1, *member)``."""
    return s.value if s.stacked else s.value.unsqueeze(0)


def _project(x: Tensor, stacked: bool, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ W.T + b`` per member: ``x`` ``(P or 1, N, L, in)``, ``W`` ``(P, out, in)``."""
    p, out, features = weight.shape
    if stacked:
        rows = x.reshape(p, -1, features)
        wt = weight.transpose(1, 2)
        y = torch.bmm(rows, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), rows, wt)
        return y.view(p, *x.shape[1:-1], out)
    # a shared input: one product with every member's weights side by side
    flat_b = None if bias is None else bias.reshape(p * out)
    y = F.linear(x[0], weight.reshape(p * out, features), flat_b)  # (N, L, P*out)
    return y.view(*y.shape[:-1], p, out).movedim(-2, 0)


def _additive(mask: Stacked, dtype: torch.dtype) -> Tensor | None:
    """A mask as torch's ``_canonical_mask`` makes it (``True``: ``-inf``), members leading."""
    m = _leading(mask)
    if m.dtype == torch.bool:
        return torch.zeros_like(m, dtype=dtype).masked_fill_(m, float("-inf"))
    return m if m.dtype == dtype else None


def _inputs(module: nn.MultiheadAttention, q: Stacked, k: Stacked, v: Stacked) -> Any:
    """Query, key, value as ``(P or 1, N, L, features)`` and whether the member's were
    batched; ``None`` for shapes the module refuses (the loop raises its error)."""
    member = q.value.dim() - q.stacked
    if member not in (2, 3) or any(t.value.dim() - t.stacked != member for t in (k, v)):
        return None
    batched = member == 3
    out = []
    for t, features in ((q, module.embed_dim), (k, module.kdim), (v, module.vdim)):
        x = _leading(t)
        if x.shape[-1] != features:
            return None
        if not batched:
            x = x.unsqueeze(1)
        elif not module.batch_first:
            x = x.transpose(1, 2)
        out.append(x)
    qx, kx, vx = out
    if kx.shape[1:3] != vx.shape[1:3] or qx.shape[1] != kx.shape[1]:
        return None
    return qx, kx, vx, batched


def _projections(
    module: nn.MultiheadAttention, w: Weights, q: Stacked, k: Stacked, v: Stacked, xs: Any
) -> tuple[Tensor, Tensor, Tensor]:
    qx, kx, vx, _ = xs
    e, bias = module.embed_dim, w["in_proj_bias"]
    b = (None, None, None) if bias is None else (bias[:, :e], bias[:, e : 2 * e], bias[:, 2 * e :])
    weight = w["in_proj_weight"]
    if weight is None:  # kdim/vdim: separate projection weights
        ws = (w["q_proj_weight"], w["k_proj_weight"], w["v_proj_weight"])
    elif q.value is k.value and k.value is v.value:  # self-attention: one packed product
        return _project(qx, q.stacked, weight, bias).split(e, dim=-1)
    else:
        ws = (weight[:, :e], weight[:, e : 2 * e], weight[:, 2 * e :])
    return tuple(  # type: ignore[return-value]
        _project(x, s.stacked, wi, bi)  # type: ignore[arg-type]
        for x, s, wi, bi in zip((qx, kx, vx), (q, k, v), ws, b, strict=True)
    )


def _masks(
    module: nn.MultiheadAttention, a: dict[str, Stacked], dtype: torch.dtype,
    n: int, lengths: tuple[int, int], batched: bool,
) -> tuple[Tensor | None, Tensor | None] | None:  # fmt: skip
    """The attention mask ``(P|1, N|1, H|1, L, S)`` and the key padding mask
    ``(P|1, N|1, 1, 1, S)``, additive; ``None`` for a mask the module refuses."""
    target, source = lengths
    heads = module.num_heads
    kpm, mask = a["key_padding_mask"], a["attn_mask"]
    padding = attn = None
    if kpm.value is not None:
        if mask.value is not None and (kpm.value.dtype == torch.bool) != (
            mask.value.dtype == torch.bool
        ):
            return None  # (mixed kinds: torch warns once per call; the loop does that)
        padding = _additive(kpm, dtype)
        if padding is None or padding.shape[1:] != ((n, source) if batched else (source,)):
            return None
        padding = padding.view(padding.shape[0], n, 1, 1, source)
    if mask.value is not None:
        attn = _additive(mask, dtype)
        if attn is None:
            return None
        if attn.dim() == 3 and attn.shape[1:] == (target, source):
            attn = attn.view(attn.shape[0], 1, 1, target, source)
        elif attn.dim() == 4 and attn.shape[1:] == (n * heads, target, source):
            attn = attn.view(attn.shape[0], n, heads, target, source)
        else:
            return None
    return attn, padding


def multihead_attention(
    module: nn.Module, w: Weights, args: tuple[Stacked, ...], kwargs: dict[str, Stacked], p: int
) -> Stacked | None:
    """The rule of ``nn.MultiheadAttention``: ``(output, weights or None)`` for all members."""
    assert isinstance(module, nn.MultiheadAttention)
    try:
        bound = _SIGNATURE.bind(module, *args, **kwargs)
    except TypeError:
        return None
    a = {k: v for k, v in bound.arguments.items() if k != "self"}
    for name, param in _SIGNATURE.parameters.items():
        if name != "self" and name not in a:
            a[name] = Stacked(param.default, False)
    flags = [a[f] for f in ("need_weights", "average_attn_weights", "is_causal")]
    q, k, v = a["query"], a["key"], a["value"]
    if any(f.stacked or not isinstance(f.value, bool) for f in flags) or not all(
        isinstance(t.value, Tensor) and t.value.is_floating_point() for t in (q, k, v)
    ):
        return None
    need_weights, average, is_causal = (f.value for f in flags)
    xs = _inputs(module, q, k, v)
    dtype = q.value.dtype
    if xs is None or any(t.value.dtype != dtype for t in (k, v)):
        return None
    qx, kx, _, batched = xs
    n, target, source = qx.shape[1], qx.shape[2], kx.shape[2]
    masks = _masks(module, a, dtype, n, (target, source), batched)
    if masks is None or (is_causal and masks[0] is None):
        return None  # (is_causal needs attn_mask: the loop raises torch's error)
    attn, padding = masks
    causal = is_causal and padding is None and not need_weights
    if causal:
        attn = None  # (the hint, as torch reads it: SDPA's is_causal instead of the mask)
    qp, kp, vp = _projections(module, w, q, k, v, xs)
    if w["bias_k"] is not None and w["bias_v"] is not None:
        kp = torch.cat([kp, w["bias_k"].view(p, 1, 1, -1).expand(p, n, 1, -1)], dim=2)
        vp = torch.cat([vp, w["bias_v"].view(p, 1, 1, -1).expand(p, n, 1, -1)], dim=2)
        attn, padding = (F.pad(m, (0, 1)) if m is not None else None for m in (attn, padding))
    heads = module.num_heads
    dim = module.embed_dim // heads
    qh = qp.reshape(p, n, target, heads, dim).transpose(2, 3)  # (P, N, H, L, D)
    kh = kp.reshape(p, n, kp.shape[2], heads, dim).transpose(2, 3)
    vh = vp.reshape(p, n, vp.shape[2], heads, dim).transpose(2, 3)
    if module.add_zero_attn:
        zeros = kh.new_zeros(p, n, heads, 1, dim)
        kh, vh = torch.cat([kh, zeros], dim=3), torch.cat([vh, zeros], dim=3)
        attn, padding = (F.pad(m, (0, 1)) if m is not None else None for m in (attn, padding))
    merged = padding if attn is None else attn if padding is None else attn + padding
    weights = None
    if need_weights:
        scores = torch.matmul(qh * math.sqrt(1.0 / float(dim)), kh.transpose(-2, -1))
        if merged is not None:
            scores = scores + merged
        weights = torch.softmax(scores, dim=-1)  # (P, N, H, L, S)
        out = torch.matmul(weights, vh)
        if average:
            weights = weights.mean(dim=2)
        if not batched:
            weights = weights.squeeze(1)
    else:
        out = _sdpa(qh, kh, vh, merged, causal)
    out = out.transpose(2, 3).reshape(p, n, target, module.embed_dim)
    out = _project(out, True, w["out_proj.weight"], w["out_proj.bias"])  # type: ignore[arg-type]
    if not batched:
        out = out.squeeze(1)
    elif not module.batch_first:
        out = out.transpose(1, 2)
    return Stacked((out, weights), True)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    """SDPA over ``(P, N, H, L, D)`` with the members and the batch as one batch dimension."""
    p, n = q.shape[:2]
    if mask is not None:
        mask = mask.expand(p, n, *mask.shape[2:]).reshape(p * n, *mask.shape[2:])
    out = F.scaled_dot_product_attention(
        q.reshape(p * n, *q.shape[2:]), k.reshape(p * n, *k.shape[2:]),
        v.reshape(p * n, *v.shape[2:]), attn_mask=mask, is_causal=causal,
    )  # fmt: skip
    return out.view(p, n, *out.shape[1:])


def outputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """What the module returns, as seen while tracing: per item of its output tuple, ``None``
    where it is ``None`` whatever the inputs (the weights without ``need_weights``), else
    ``True``. A forward that tests ``weights is None`` is traced as it runs."""
    try:
        bound = _SIGNATURE.bind(module, *args, **kwargs)
    except TypeError:
        return (True, True)
    need = bound.arguments.get("need_weights", True)
    return (True, None) if need is False else (True, True)


def no_rule_reason(module: nn.Module) -> str | None:
    """Why a module that only a rule can batch (its forward is not traceable) has none now."""
    if defined_forward(module) is nn.MultiheadAttention.forward and call_rule(module) is None:
        return (
            f"{type(module).__name__} draws random numbers (dropout in train mode: each member "
            "draws its own in the loop; vmap or the loop run it)"
        )
    return None


CALL_RULES: dict[Any, tuple[CallRule, tuple[str, ...]]] = {
    nn.MultiheadAttention.forward: (multihead_attention, _NAMES),
}


def call_rule(module: nn.Module) -> tuple[CallRule, tuple[str, ...]] | None:
    """The several-input rule of ``module`` in its current state, or ``None``."""
    found = CALL_RULES.get(defined_forward(module))
    if found is None:
        return None
    if isinstance(module, nn.MultiheadAttention) and module.training and module.dropout > 0:
        return None
    return found
