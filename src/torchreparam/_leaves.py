"""The unwrapped module's own parameters: real leaf ``nn.Parameter`` objects over the storage of
``flat_param`` (as FSDP's ``use_orig_params``), so that the module is a plain module to every
tool that walks ``module.parameters()``: optimizers, ``clip_grad_norm_``, ``requires_grad_``,
``zero_grad``, ``get_parameter``, ``torch.autograd.grad(loss, module.parameters())``.

- Storage: each leaf aliases its slice of ``flat_param`` (writes through either side are seen by
  the other; an in-place update bumps the version counter they share). A leaf given new storage
  (``param.data = t``, ``param.set_(t)``, as ``vector_to_parameters`` and parametrizations'
  ``right_inverse`` do) is noticed at the next read and copied back into ``flat_param``; a
  converted ``flat_param`` (``.double()``, ``.to()``) re-aliases the same leaf objects.
- Gradients: a leaf's ``.grad`` is a view of ``flat_param.grad`` (as DDP's
  ``gradient_as_bucket_view``), whichever side the gradient arrived through; a side that was
  reset (``zero_grad`` of either) is reset in the other before the next accumulation.

The leaves are made on first use only: a wrapper whose unwrapped module is never used on its
own pays nothing.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from ._layout import FlatLayout

__all__ = ["Leaves"]


class Leaves:
    """The leaf parameters of one wrapped tree, one per layout entry (tied names share one)."""

    def __init__(self, layout: FlatLayout, flat: Tensor) -> None:
        self.layout = layout
        data = flat.detach()
        self.params = tuple(
            nn.Parameter(data[e.offset : e.offset + e.numel].view(e.shape), flat.requires_grad)
            for e in layout.entries
        )
        self.flat: Tensor | None = None
        self.base = 0
        self.ptrs: tuple[int, ...] = ()
        self.grad: tuple[Tensor, tuple[Tensor, ...]] | None = None  # (flat grad, its views)
        self.handles: list[Any] = []
        self.ref = weakref.ref(self)  # hooks hold it weakly: no cycle through the tensors
        self.lock = threading.RLock()
        for i, leaf in enumerate(self.params):
            leaf.register_hook(functools.partial(_relay, self.ref, "before_leaf", i))
            leaf.register_post_accumulate_grad_hook(
                functools.partial(_relay, self.ref, "after_leaf", i)
            )
        self._attach(flat)
        if flat.grad is not None:  # gradients from before the leaves existed: theirs too
            self.after_flat(None, flat)

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("leaves are not copied: they are made again on first use")

    # ---- storage ----------------------------------------------------------------------------
    def _attach(self, flat: Tensor) -> None:
        """Follow ``flat`` (new object, storage, dtype or device): same leaf objects."""
        if flat is not self.flat or flat.data_ptr() != self.base:
            self.grad = None  # views of the old gradient: no longer flat_param's
        if flat is not self.flat:
            for handle in self.handles:
                handle.remove()
            self.handles = [
                flat.register_hook(functools.partial(_relay, self.ref, "before_flat", None)),
                flat.register_post_accumulate_grad_hook(
                    functools.partial(_relay, self.ref, "after_flat", None)
                ),
            ]
        self.flat = flat
        data = flat.detach()
        for leaf, entry in zip(self.params, self.layout.entries, strict=True):
            if not _aliases(leaf, data, entry.offset):
                view = data[entry.offset : entry.offset + entry.numel].view(entry.shape)
                grad = leaf.grad
                leaf.data = view
                if grad is not None and (grad.dtype, grad.device) != (view.dtype, view.device):
                    leaf.grad = grad.to(view)
        self.base = flat.data_ptr()
        self.ptrs = tuple(leaf.data_ptr() for leaf in self.params)

    def leaf(self, flat: Tensor, slot: int) -> nn.Parameter:
        """The leaf for ``slot``, after making sure it still aliases ``flat`` (O(1))."""
        leaf = self.params[slot]
        if (
            flat is not self.flat
            or flat.data_ptr() != self.base
            or leaf.data_ptr() != self.ptrs[slot]
            or leaf.dtype != flat.dtype
        ):
            self.sync(flat)
        return leaf

    def sync(self, flat: Tensor) -> None:
        """Copy every leaf that was given new storage into ``flat``, then alias them all again."""
        changed = flat is not self.flat or flat.data_ptr() != self.base
        if not changed:
            data = flat.detach()
            for leaf, entry, ptr in zip(self.params, self.layout.entries, self.ptrs, strict=True):
                if leaf.data_ptr() == ptr and leaf.dtype == flat.dtype:
                    continue
                changed = True
                if tuple(leaf.shape) != entry.shape:
                    raise ValueError(
                        f"parameter {entry.name!r} of the wrapped module was given shape "
                        f"{tuple(leaf.shape)}, but flat_param holds {entry.shape}: the layout "
                        "of a wrapped model is fixed; change shapes before wrapping"
                    )
                with torch.no_grad():
                    data[entry.offset : entry.offset + entry.numel].copy_(leaf.reshape(-1))
        if changed:
            self._attach(flat)

    def mixed(self, flat: Tensor) -> bool:
        """Whether some leaf's ``requires_grad`` differs from ``flat_param``'s."""
        want = flat.requires_grad
        return any(leaf.requires_grad is not want for leaf in self.params)

    # ---- gradients --------------------------------------------------------------------------
    def _views(self, grad: Tensor) -> tuple[Tensor, ...]:
        if self.grad is None or self.grad[0] is not grad:
            views = tuple(self.layout.unflatten(grad.detach()).values())
            for view in views:
                view._torchreparam_view = True  # type: ignore[attr-defined]
            self.grad = (grad, views)
        return self.grad[1]

    def _live(self) -> tuple[Tensor, ...] | None:
        """The views of ``flat_param.grad`` the leaves should hold (``None``: it was reset or
        replaced since they were made)."""
        flat, grad = self.flat, self.grad
        if flat is None or grad is None or grad[0] is not flat.grad:
            return None
        return grad[1]

    def before_flat(self, slot: None, incoming: Tensor) -> None:
        """Before ``flat_param`` accumulates: slices whose leaf was reset (or given another
        gradient tensor) take that state first."""
        views = self._live()
        if views is None:
            return
        with torch.no_grad():
            for leaf, view in zip(self.params, views, strict=True):
                own = leaf.grad
                if own is view:
                    continue
                if own is None:
                    view.zero_()
                else:
                    view.copy_(own)

    def after_flat(self, slot: None, flat: Tensor) -> None:
        """After ``flat_param`` accumulated: every trainable leaf's ``.grad`` views its slice."""
        grad = flat.grad
        if grad is None or grad.is_sparse:
            return
        for leaf, view in zip(self.params, self._views(grad), strict=True):
            if leaf.requires_grad and leaf.grad is not view:
                leaf.grad = view

    def before_leaf(self, slot: int, incoming: Tensor) -> None:
        leaf = self.params[slot]
        own, views = leaf.grad, self._live()
        if own is None or (views is not None and own is views[slot]):
            return
        if getattr(own, "_torchreparam_view", False):
            leaf.grad = None  # it viewed a flat gradient that was reset since: so is it

    def after_leaf(self, slot: int, leaf: Tensor) -> None:
        flat = self.flat
        if flat is None or leaf.grad is None or leaf.grad.requires_grad:
            return
        grad = flat.grad
        if grad is None:
            grad = torch.zeros_like(flat, memory_format=torch.contiguous_format)
            flat.grad = grad
        view = self._views(grad)[slot]
        if leaf.grad is not view:
            with torch.no_grad():
                view.copy_(leaf.grad)
            leaf.grad = view


def _relay(ref: Any, method: str, slot: int | None, arg: Tensor) -> None:
    leaves = ref()
    if leaves is not None:
        with leaves.lock:  # backward passes of several threads: one hook body at a time
            getattr(leaves, method)(slot, arg)


def _aliases(leaf: Tensor, data: Tensor, offset: int) -> bool:
    return (
        leaf.dtype == data.dtype
        and leaf.device == data.device
        and (leaf.numel() == 0 or leaf.data_ptr() == data.data_ptr() + offset * data.element_size())
    )
