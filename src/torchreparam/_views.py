"""Making parameter-shaped views of a flat vector, fast, with a gradient that is one tensor.

Two paths give the same values and gradients:

- the fast path (plain tensors in eager mode): one C++ call makes every view; when the flat
  vector requires grad, an ``autograd.Function`` wraps it so that the backward is a single
  ``torch.cat`` of the views' gradients (per-view ``narrow`` backwards would each build a
  full-length gradient: O(tensors x N)), and whose ``jvp`` serves forward-mode AD (dual
  vectors of ``torch.autograd.forward_ad``);
- the traceable path (``torch.compile``, ``torch.jit.trace``, ``torch.func`` transforms, tensor
  subclasses, zero-size parameters): ``split`` + ``view``, plain aten ops every tracer knows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from ._layout import FlatLayout

__all__ = ["PLAIN", "ViewMaker"]

_unflatten = torch._C._nn.unflatten_dense_tensors
_flatten = torch._C._nn.flatten_dense_tensors  # one C++ cat of the reshaped grads
_below_view_tracking = torch._C._AutoDispatchBelowADInplaceOrView
_functorch_active = torch._C._are_functorch_transforms_active
_is_tracing = torch._C._is_tracing
# dynamo (export's non-strict tracing hands in tensor subclasses: the type check sends them on)
_is_compiling = torch.compiler.is_dynamo_compiling
PLAIN = (Tensor, torch.nn.Parameter)  # the tensor types the C++ path takes (no subclasses)


class _Unflatten(torch.autograd.Function):
    """Views of ``flat`` shaped like ``refs``; backward: one differentiable ``cat``.

    Each :class:`ViewMaker` calls a subclass of its own whose class attribute ``refs`` holds
    its shape carriers (see :func:`_unflatten_for`): ``jvp``, which is handed no non-tensor
    input, reads them there (``ctx._forward_cls.refs``), so the forward stores nothing on
    ``ctx`` (an attribute set there would cost every call with a vector that requires grad)."""

    refs: list[Tensor]

    @staticmethod
    def forward(ctx: Any, flat: Tensor, refs: list[Tensor]) -> tuple[Tensor, ...]:
        return tuple(_unflatten(flat, refs))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, None]:
        # Grads arrive materialized (zeros for unused views), so the cat always has N elements.
        # The cat is made of differentiable ops: second-order gradients (MAML) flow through it.
        return _flat_grad(grads), None  # (rare layouts: see _cat_slow)

    @staticmethod
    def jvp(ctx: Any, flat_tangent: Tensor, _: None) -> tuple[Tensor, ...]:
        # Forward-mode AD (``torch.autograd.forward_ad`` dual vectors): the views' tangents are
        # the same views of the vector's tangent (views, as autograd requires of view outputs).
        return tuple(_unflatten(flat_tangent, ctx._forward_cls.refs))


class _OwnUnflatten(_Unflatten):
    """Views of ``flat_param`` that also have the unwrapped module's leaf parameters as inputs
    (see :mod:`._leaves`), so that ``torch.autograd.grad(loss, net.parameters())`` reaches
    them; each backward pass sends the gradient to one accumulator only.

    A ``backward()`` that accumulates into ``flat_param`` gets the whole gradient there, and
    nothing through the leaves (their ``.grad`` are views of ``flat_param.grad``). Two
    accumulators writing the same memory would do it under two locks: torch serializes
    accumulation per tensor, so concurrent backward passes could lose part of a gradient.
    Gradients the pass asks of the leaves (``autograd.grad`` inputs, ``backward(inputs=...)``)
    go to them when ``flat_param`` does not accumulate in that pass."""

    @staticmethod
    def forward(ctx: Any, flat: Tensor, refs: list[Tensor], *leaves: Tensor) -> tuple[Tensor, ...]:
        return tuple(_unflatten(flat, refs))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        nodes = ctx.next_functions  # (flat_param's, then the leaves': None if frozen)
        to_flat = _wanted(nodes[0][0])
        if to_flat == "accumulate":  # (a backward() pass: no leaf is an autograd.grad input)
            return (_flat_grad(grads), None, *(None,) * len(grads))
        leaves = [
            g if _wanted(node) else None for g, (node, _) in zip(grads, nodes[1:], strict=True)
        ]
        return (_flat_grad(grads) if to_flat else None, None, *leaves)

    @staticmethod
    def jvp(ctx: Any, flat_tangent: Tensor, _: None, *leaf_tangents: Tensor) -> tuple[Tensor, ...]:
        return tuple(_unflatten(flat_tangent, ctx._forward_cls.refs))


_will_execute = torch._C._will_engine_execute_node


def _wanted(node: Any) -> str | None:
    """What the running backward pass does at ``node`` (an input's gradient accumulator):
    ``"accumulate"`` (into ``.grad``), ``"capture"`` (an ``autograd.grad`` input) or None."""
    if node is None:
        return None
    try:
        return "accumulate" if _will_execute(node) else None
    except RuntimeError:  # (torch refuses to answer for an autograd.grad input: it is one)
        return "capture"


def _flat_grad(grads: tuple[Tensor, ...]) -> Tensor:
    try:
        return _flatten(list(grads))
    except RuntimeError:
        return _cat_slow(grads)


def _cat_slow(grads: tuple[Tensor, ...]) -> Tensor:
    """The flat gradient when the C++ flatten refuses: sparse grads (``Embedding(sparse=True)``)
    are densified, since one flat vector has one dense gradient; batched grads
    (``autograd.grad(is_grads_batched=True)``) go through ``cat``, which has a batching rule."""
    return torch.cat([(g.to_dense() if g.is_sparse else g).reshape(-1) for g in grads])


# ``Function.apply`` first maps functorch's unwrapping over every argument (~2 us here); the
# fast path has already ruled functorch out, so it calls the C++ apply directly when present.
_base_apply = getattr(torch._C._FunctionBase, "__dict__", {}).get("apply")


def _unflatten_for(refs: list[Tensor], kind: type[_Unflatten] = _Unflatten) -> Any:
    """``apply`` of a subclass of ``kind`` that holds ``refs`` (for its ``jvp``)."""
    function: type[_Unflatten] = type(
        kind.__name__, (kind,), {"refs": refs, "__module__": __name__}
    )
    return _base_apply.__get__(None, function) if _base_apply is not None else function.apply


class ViewMaker:
    """Turns a flat vector into a tuple of views, one per layout entry, in layout order."""

    __slots__ = ("always_traceable", "apply", "apply_own", "refs", "shapes", "sizes", "strided")

    def __init__(self, layout: FlatLayout) -> None:
        self.shapes = tuple(e.shape for e in layout.entries)
        self.sizes = tuple(e.numel for e in layout.entries)
        self.strided = _strided(self.shapes, self.sizes)
        # Shape carriers for the C++ unflatten, which reads only sizes: meta tensors cost nothing.
        self.refs = [torch.empty(s, device="meta") for s in self.shapes]
        self.apply = _unflatten_for(self.refs)
        self.apply_own = _unflatten_for(self.refs, _OwnUnflatten)
        # The C++ unflatten returns (0,)-shaped fresh tensors for empty entries: not views.
        self.always_traceable = any(n == 0 for n in self.sizes)

    def __getstate__(self) -> dict[str, object]:
        return {"shapes": self.shapes, "sizes": self.sizes, "always": self.always_traceable}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.shapes = state["shapes"]  # type: ignore[assignment]
        self.sizes = state["sizes"]  # type: ignore[assignment]
        self.always_traceable = state["always"]  # type: ignore[assignment]
        self.strided = _strided(self.shapes, self.sizes)
        self.refs = [torch.empty(s, device="meta") for s in self.shapes]
        self.apply = _unflatten_for(self.refs)
        self.apply_own = _unflatten_for(self.refs, _OwnUnflatten)

    def fast_path_ok(self, flat: Tensor) -> bool:
        """Whether ``flat`` can take the C++ path: a plain tensor, outside every tracer."""
        return (
            type(flat) in PLAIN
            and not self.always_traceable
            and not _is_compiling()
            and not _is_tracing()
            and not _functorch_active()
        )

    def __call__(self, flat: Tensor) -> tuple[Tensor, ...]:
        """Views of ``flat`` (shape ``(num_params,)``), differentiable w.r.t. ``flat``."""
        return self.fast(flat) if self.fast_path_ok(flat) else self.traceable(flat)

    def fast(self, flat: Tensor) -> tuple[Tensor, ...]:
        """The C++ path (callers check :meth:`fast_path_ok` first)."""
        if not torch.is_grad_enabled() and _forward_ad._current_level < 0:
            # No graph is recorded, so autograd's view bookkeeping buys nothing here. (Unless a
            # forward-AD dual level is open: no_grad does not stop forward AD, and skipping the
            # autograd keys would drop the tangents of a dual vector silently.)
            with _below_view_tracking():
                return tuple(_unflatten(flat, self.refs))
        if flat.requires_grad:
            return self.apply(flat, self.refs)  # type: ignore[no-any-return,unused-ignore]
        return tuple(_unflatten(flat, self.refs))

    def own(self, flat: Tensor, leaves: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Views of ``flat_param`` whose gradient also reaches ``leaves`` when a backward pass
        asks for theirs (see :class:`_OwnUnflatten`); the fast path's, else :meth:`__call__`."""
        if flat.requires_grad and torch.is_grad_enabled() and self.fast_path_ok(flat):
            return self.apply_own(flat, self.refs, *leaves)  # type: ignore[no-any-return,unused-ignore]
        return self(flat)

    def rows(self, flats: Tensor) -> tuple[Tensor, ...]:
        """Views ``(population, *shape)`` of a ``(population, num_params)`` matrix, one per entry
        (slices of its rows: ``view`` splits a contiguous last dimension, so no copy)."""
        population = flats.shape[0]
        if (
            not (flats.requires_grad and torch.is_grad_enabled())
            and flats.is_contiguous()
            and self.fast_path_ok(flats)
        ):  # no graph to record: one strided view per entry, straight from the storage
            start, stride = flats.storage_offset(), flats.stride(0)
            as_strided = flats.as_strided
            return tuple(  # (a list first: faster than a generator into tuple)
                [
                    as_strided((population, *shape), (stride, *inner), start + offset)
                    for shape, inner, offset in self.strided
                ]
            )
        return tuple(
            chunk.view(population, *shape)
            for chunk, shape in zip(flats.split(self.sizes, dim=1), self.shapes, strict=True)
        )

    def traceable(self, flat: Tensor) -> tuple[Tensor, ...]:
        """``split`` + ``view``: the path every tracer and ``torch.func`` transform supports."""
        return tuple(
            chunk.view(shape)
            for chunk, shape in zip(flat.split(self.sizes), self.shapes, strict=True)
        )


def _strided(
    shapes: tuple[tuple[int, ...], ...], sizes: tuple[int, ...]
) -> tuple[tuple[tuple[int, ...], tuple[int, ...], int], ...]:
    """Per entry: its shape, its contiguous strides and its offset in the flat vector."""
    out, offset = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append((shape, torch.empty(shape, device="meta").stride(), offset))
        offset += size
    return tuple(out)
