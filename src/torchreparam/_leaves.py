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

- Two writes are checked on the spot (the leaves are :class:`Leaf`, an ``nn.Parameter``
  subclass): ``param.data = t`` or ``param.set_(t)`` with another shape is refused before
  anything changes (the layout is fixed: Hugging Face's ``resize_token_embeddings`` after
  wrapping), and ``param.grad = None`` (``optimizer.zero_grad()``) resets its slice of
  ``flat_param.grad`` at once (``flat_param.grad`` becomes ``None`` with the last one).

The leaves are made on first use only: a wrapper whose unwrapped module is never used on its
own pays nothing.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from ._layout import FlatLayout

__all__ = ["Leaf", "Leaves"]

_DATA: Any = vars(torch._C.TensorBase)["data"]  # the descriptors plain tensors use (unchecked)
_GRAD: Any = vars(torch._C.TensorBase)["grad"]
_DATA_PTR = torch._C.TensorBase.data_ptr  # (C-level reads: a subclass's attribute lookup costs)
_DTYPE = vars(torch._C.TensorBase)["dtype"].__get__
_REQUIRES_GRAD = vars(torch._C.TensorBase)["requires_grad"].__get__
_OWNER = "_torchreparam_owner"  # on a leaf: (weak reference to its Leaves, slot)
_WINDOW_TIMEOUT = 120.0  # seconds (a holder that raised between its hooks never lets go)


def _owner(leaf: Tensor) -> tuple[Leaves, int] | None:
    owner = leaf.__dict__.get(_OWNER)
    if owner is None:
        return None  # (a Leaf not made by Leaves: checked as nothing)
    leaves = owner[0]()
    return None if leaves is None else (leaves, owner[1])


def _set_data(leaf: Tensor, value: Tensor) -> None:
    owner = _owner(leaf)
    if owner is not None and isinstance(value, Tensor):
        owner[0].check_shape(owner[1], value.shape, ".data = t")
    _DATA.__set__(leaf, value)


def _set_grad(leaf: Tensor, value: Tensor | None) -> None:
    owner = _owner(leaf)
    if owner is None or value is not None:
        _GRAD.__set__(leaf, value)
    else:
        owner[0].reset(owner[1])


class Leaf(nn.Parameter):
    """A parameter of the unwrapped module: a plain ``nn.Parameter`` to every reader, whose
    storage is its slice of ``flat_param``. Copies and pickles are plain ``nn.Parameter``."""

    data = property(_DATA.__get__, _set_data)
    grad = property(_GRAD.__get__, _set_grad)

    def set_(self, *args: Any, **kwargs: Any) -> Tensor:
        before = _DATA.__get__(self)
        out = torch._C.TensorBase.set_(self, *args, **kwargs)
        owner = _owner(self)
        if owner is not None:
            try:
                owner[0].check_shape(owner[1], self.shape, ".set_(t)")
            except ValueError:
                _DATA.__set__(self, before)  # as it was: the refusal changes nothing
                raise
        return out

    def __deepcopy__(self, memo: dict[int, Any]) -> nn.Parameter:
        if id(self) not in memo:
            data = _DATA.__get__(self).clone(memory_format=torch.preserve_format)
            memo[id(self)] = nn.Parameter(data, self.requires_grad)
        return memo[id(self)]  # type: ignore[no-any-return,unused-ignore]

    def __reduce_ex__(self, proto: Any) -> tuple[Any, ...]:
        data = _DATA.__get__(self)
        return (torch._utils._rebuild_parameter, (data, self.requires_grad, OrderedDict()))

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        plain = _DATA.__get__(self).requires_grad_(self.requires_grad)
        return f"Parameter containing:\n{plain!r}"


class Leaves:
    """The leaf parameters of one wrapped tree, one per layout entry (tied names share one)."""

    def __init__(self, layout: FlatLayout, flat: Tensor) -> None:
        self.layout = layout
        data = flat.detach()
        self.params = tuple(
            Leaf(data[e.offset : e.offset + e.numel].view(e.shape), flat.requires_grad)
            for e in layout.entries
        )
        self.flat: Tensor | None = None
        self.base = 0
        self.ptrs: tuple[int, ...] = ()
        self.grad: tuple[Tensor, tuple[Tensor, ...]] | None = None  # (flat grad, its views)
        self.handles: list[Any] = []
        self.ref = weakref.ref(self)  # hooks hold it weakly: no cycle through the tensors
        self.lock = threading.RLock()
        self.window = threading.Lock()  # one accumulation into flat_param.grad at a time
        self.hint = 0  # where the last search for a leaf holding its view of the grad ended
        self.unhooked = set()  # frozen leaves: hooked when they are unfrozen (see leaf())
        for i, leaf in enumerate(self.params):
            leaf.__dict__[_OWNER] = (self.ref, i)
            self._hook(i) if flat.requires_grad else self.unhooked.add(i)
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
        if flat is not self.flat or self._unhooked(flat):
            for handle in self.handles:
                handle.remove()
            self.handles = []
            if flat.requires_grad:  # (a frozen one gets them when it is unfrozen)
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
                grad = _GRAD.__get__(leaf)
                _DATA.__set__(leaf, view)
                if grad is not None and (grad.dtype, grad.device) != (view.dtype, view.device):
                    _GRAD.__set__(leaf, grad.to(view))
        self.base = flat.data_ptr()
        self.ptrs = tuple(leaf.data_ptr() for leaf in self.params)

    def _hook(self, slot: int) -> None:
        leaf = self.params[slot]
        leaf.register_hook(functools.partial(_relay, self.ref, "before_leaf", slot))
        leaf.register_post_accumulate_grad_hook(
            functools.partial(_relay, self.ref, "after_leaf", slot)
        )
        self.unhooked.discard(slot)

    def leaf(self, flat: Tensor, slot: int) -> nn.Parameter:
        """The leaf for ``slot``, after making sure it still aliases ``flat`` (O(1))."""
        leaf = self.params[slot]
        if self.unhooked and slot in self.unhooked and leaf.requires_grad:
            self._hook(slot)  # (a hook cannot be registered on a tensor that is frozen)
        if (
            flat is not self.flat
            or flat.data_ptr() != self.base
            or leaf.data_ptr() != self.ptrs[slot]
            or leaf.dtype != flat.dtype
            or self._unhooked(flat)
        ):
            self.sync(flat)
        return leaf

    def _unhooked(self, flat: Tensor) -> bool:
        """``flat`` was unfrozen since it was attached: its hooks are still to be registered."""
        return not self.handles and flat.requires_grad

    def sync(self, flat: Tensor) -> None:
        """Copy every leaf that was given new storage into ``flat``, then alias them all again."""
        changed = flat is not self.flat or flat.data_ptr() != self.base or self._unhooked(flat)
        if not changed:
            params, dtype = self.params, flat.dtype
            if tuple(map(_DATA_PTR, params)) == self.ptrs and all(
                _DTYPE(leaf) is dtype for leaf in params
            ):
                return  # (the common case: C-level reads, no tensor made)
            data = flat.detach()
            for leaf, entry, ptr in zip(self.params, self.layout.entries, self.ptrs, strict=True):
                if leaf.data_ptr() == ptr and leaf.dtype == flat.dtype:
                    continue
                changed = True
                if tuple(leaf.shape) != entry.shape:  # (given through torch's own setters)
                    raise ValueError(
                        f"parameter {entry.name!r} of the wrapped module was given shape "
                        f"{tuple(leaf.shape)}, but flat_param holds {entry.shape}: the layout "
                        "of a wrapped model is fixed; change shapes before wrapping"
                    )
                with torch.no_grad():
                    data[entry.offset : entry.offset + entry.numel].copy_(leaf.reshape(-1))
        if changed:
            self._attach(flat)

    def check_shape(self, slot: int, shape: torch.Size, operation: str) -> None:
        """Refuse giving leaf ``slot`` storage of another shape (before it is given)."""
        entry = self.layout.entries[slot]
        if tuple(shape) != entry.shape:
            names = " / ".join(repr(n) for n in (entry.name, *entry.aliases))
            raise ValueError(
                f"{operation} of shape {tuple(shape)} on parameter {names} of a model wrapped "
                f"by torchreparam, which holds {entry.shape} in flat_param: the layout of a "
                "wrapped model is fixed at wrapping; change shapes before wrapping (for "
                "example, call Hugging Face's resize_token_embeddings, then wrap)"
            )

    def mixed(self, flat: Tensor) -> bool:
        """Whether some leaf's ``requires_grad`` differs from ``flat_param``'s."""
        want = flat.requires_grad
        return any(_REQUIRES_GRAD(leaf) is not want for leaf in self.params)

    # ---- gradients --------------------------------------------------------------------------
    # Torch serializes the accumulation of each tensor under a lock of its own, and a leaf's
    # ``.grad`` is a view of ``flat_param.grad``: a gradient that reaches a leaf itself (a weight
    # used outside a call of the module) is written into the memory that ``flat_param``'s
    # accumulation writes, under another lock. So every accumulation into that memory, through
    # ``flat_param`` or a leaf, runs in a window that one thread holds at a time: from the
    # tensor's gradient hook (just before torch accumulates) to its post-accumulate hook (just
    # after), both run by the thread that accumulates.
    def enter(self) -> None:
        held = _HELD.__dict__.setdefault("ids", set())
        if id(self) in held:
            return
        if not self.window.acquire(timeout=_WINDOW_TIMEOUT):
            raise RuntimeError(
                "torchreparam: a gradient accumulation into flat_param.grad waited "
                f"{_WINDOW_TIMEOUT:.0f} s for another thread's to end: that backward pass "
                "raised between its gradient hooks (see its exception)"
            )
        held.add(id(self))

    def holding(self) -> bool:
        held = getattr(_HELD, "ids", None)
        return bool(held) and id(self) in held  # type: ignore[operator]

    def leave(self) -> None:
        held = getattr(_HELD, "ids", None)
        if held and id(self) in held:
            held.discard(id(self))
            self.window.release()

    def reset(self, slot: int) -> None:
        """``leaf.grad = None``: if the leaf held its view of ``flat_param.grad``, that slice is
        reset too (zeroed; ``flat_param.grad`` is set to ``None`` with the last view), as a
        plain module's gradients would be by the time anything reads them."""
        with self.lock:
            leaf = self.params[slot]
            held = _GRAD.__get__(leaf)
            _GRAD.__set__(leaf, None)
            views = self._live()
            if views is None or held is not views[slot]:
                return
            if self._holding(views):
                with torch.no_grad():
                    views[slot].zero_()
            else:
                self.flat.grad = None  # type: ignore[union-attr]

    def _holding(self, views: tuple[Tensor, ...]) -> bool:
        """Whether some leaf still holds its view (searched from where the last search ended,
        so that resetting every leaf in order costs O(leaves) in all)."""
        n = len(self.params)
        for k in range(n):
            i = (self.hint + k) % n
            if _GRAD.__get__(self.params[i]) is views[i]:
                self.hint = i
                return True
        return False

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
                own = _GRAD.__get__(leaf)
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
            if leaf.requires_grad and _GRAD.__get__(leaf) is not view:
                _GRAD.__set__(leaf, view)

    def before_leaf(self, slot: int, incoming: Tensor) -> None:
        leaf = self.params[slot]
        own, views = _GRAD.__get__(leaf), self._live()
        if own is None or (views is not None and own is views[slot]):
            return
        if getattr(own, "_torchreparam_view", False):
            _GRAD.__set__(leaf, None)  # it viewed a flat gradient that was reset since: so is it

    def after_leaf(self, slot: int, leaf: Tensor) -> None:
        flat, own = self.flat, _GRAD.__get__(leaf)
        if flat is None or own is None or own.requires_grad:
            return
        grad = flat.grad
        if grad is None:
            grad = torch.zeros_like(flat, memory_format=torch.contiguous_format)
            flat.grad = grad
        view = self._views(grad)[slot]
        if own is not view:
            with torch.no_grad():
                view.copy_(own)
            _GRAD.__set__(leaf, view)


_BEFORE = frozenset({"before_flat", "before_leaf"})
_HELD = threading.local()  # the ids of the Leaves whose accumulation window this thread holds


def _relay(ref: Any, method: str, slot: int | None, arg: Tensor | None) -> None:
    leaves = ref()
    if leaves is None:
        return
    if method in _BEFORE:
        if arg is None:  # an undefined gradient: torch accumulates nothing, nor do the hooks
            return
        leaves.enter()  # (before self.lock: the window's holder takes self.lock in after_*)
        try:
            with leaves.lock:  # backward passes of several threads: one hook body at a time
                getattr(leaves, method)(slot, arg)
        except BaseException:
            leaves.leave()  # (the backward pass ends here: its post-accumulate hook never runs)
            raise
        return
    if not leaves.holding():  # (its gradient hook saw none: nothing was accumulated here, and
        return  # another thread's accumulation may be under way at this tensor)
    try:
        with leaves.lock:
            getattr(leaves, method)(slot, arg)
    finally:
        leaves.leave()


def _aliases(leaf: Tensor, data: Tensor, offset: int) -> bool:
    return (
        leaf.dtype == data.dtype
        and leaf.device == data.device
        and (leaf.numel() == 0 or leaf.data_ptr() == data.data_ptr() + offset * data.element_size())
    )
