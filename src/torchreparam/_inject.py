"""Putting a flat vector into a module: per-thread bindings, and the core of a wrapped tree
(the generated classes that read them are in :mod:`._classes`).

Each submodule that holds a managed parameter (or any buffer) gets a generated subclass of its
own class whose parameter and buffer names are properties. A property looks up the innermost
binding of this module tree and otherwise returns the module's own weights: cached views of
``flat_param``. Nothing on the module is ever swapped in or out, so nothing has to be put back
after a call, whatever it raised.

Where bindings live. Every binding is pushed on a per-thread chain (a ``threading.local``),
which ``torch.compile`` traces, reads and writes, across graph breaks and without recompiling
for new tensors: compiled code, eager code run between two graphs, and a compiled submodule
inside an eager call all see the same bindings. Eager bindings are also kept in a
``ContextVar``, which each asyncio task has its own copy of, and eager reads go through it: a
``with r.unflattened_param(theta)`` block that spans an ``await`` is seen by its own task only.
(The limit: compiled code of another task on the same thread, running while such a block is
suspended, would see it. Compiled code that awaits inside such a block is rare; it is documented.)
"""

from __future__ import annotations

import contextvars
import dataclasses
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ._checks import is_dtensor
from ._layout import FlatLayout
from ._leaves import Leaves
from ._views import ViewMaker

__all__ = [
    "CHAIN",
    "CORE_KEY",
    "Core",
    "Writable",
    "bind",
    "buffer_site",
    "call_bound",
    "innermost",
    "run_in",
    "swap",
]

CORE_KEY = "_torchreparam_core"
_MAKING = threading.Lock()  # making a tree's leaves (once, on first use)


class Binding(NamedTuple):
    """The tensors one call (or ``with`` block) puts into one module tree, linked to the binding
    it shadows. The getters read it on every attribute access: a tuple, built at C speed by
    :func:`_binding` on the eager paths."""

    core: Core
    params: Sequence[Tensor] | None  # None: the module's own, read at each access
    buffers: list[Tensor] | None  # None: the module's own (or the outer binding's)
    outer: Binding | None  # the binding this one shadows (of this tree or another)
    guard: bool  # a caller's vector bound while autograd records (recomputation must see it)
    traced: bool  # made by code that dynamo traced (kept on the thread's chain only)


_new_tuple = tuple.__new__


def _binding(*fields: Any) -> Binding:
    return _new_tuple(Binding, fields)


_ACTIVE: contextvars.ContextVar[Binding | None] = contextvars.ContextVar(
    "torchreparam_active", default=None
)
_active = _ACTIVE.get
_is_dynamo = torch.compiler.is_dynamo_compiling  # ContextVar is opaque to dynamo: avoid it there


def _dead() -> None:
    return None


class _Chain(threading.local):
    """This thread's innermost binding, eager or traced (what compiled code reads)."""

    def __init__(self) -> None:  # run in every thread on its first access
        self.top: Binding | None = None  # an instance attribute: dynamo guards on the dict


CHAIN = _Chain()


def current() -> Binding | None:
    """The innermost binding this code should see (the head of the chain to search)."""
    if _is_dynamo():
        return CHAIN.top
    chain = _active()
    top = CHAIN.top
    if top is not chain and top is not None and top.traced:
        return top  # made by compiled code (its graph broke here, or it called eager code)
    return chain


class Writable(tuple):
    """Bound views of a vector torchreparam made for itself (``fresh_flat_param``): modules
    that write their weights in place may write into them (a caller's vector is copied)."""

    __slots__ = ()


def buffer_site(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """Where buffer ``name`` (a full name under ``root``) lives: (owning module, local name)."""
    owner, _, local = name.rpartition(".")
    return root.get_submodule(owner), local


def innermost(core: Core) -> Binding | None:
    """This thread's innermost binding of ``core``'s tree, if any."""
    binding = current()
    while binding is not None and binding.core is not core:
        binding = binding.outer
    return binding


class Core:
    """What every managed submodule of one wrapped tree shares: layout, views, bindings."""

    def __init__(
        self,
        layout: FlatLayout,
        holder: nn.Module,
        buffer_sites: dict[str, tuple[nn.Module, str]],
    ) -> None:
        self.layout = layout
        self.flat_shape = torch.Size([layout.numel])
        self.views = ViewMaker(layout)
        # The wrapper holds ``flat_param`` in its ``_parameters`` dict; the core keeps that dict
        # (``.to()``, FSDP and ``load_state_dict(assign=True)`` replace the entry, never the
        # dict) and only a weak reference to the wrapper: the unwrapped module keeps working
        # without it, and a dropped model is freed at once (no reference cycle).
        self.params = holder._parameters
        self._holder: Callable[[], nn.Module | None] = weakref.ref(holder)
        # buffers in module.buffers() order: full name -> (owning module, local name)
        self.buffer_names = tuple(buffer_sites)
        # (weakly: the modules reference this core, and a cycle would keep a dropped model,
        # and its memory, alive until a full garbage collection)
        self._sites = tuple((weakref.ref(m), name) for m, name in buffer_sites.values())
        self.loading_flat = False  # a wrapper-format state dict is being loaded
        self.applying = False  # the holder's _apply is converting the whole tree
        self.writes = False  # a module of the tree writes its weights in place (WRITES_WEIGHTS)
        self._cache: tuple[Tensor, tuple[int, int, bool], tuple[Tensor, ...]] | None = None
        self.memo: dict[str, Any] = {}  # what the layers above derive from the tree, to reuse
        self.leaves: Leaves | None = None  # the unwrapped module's own parameters, made on use

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None  # views are derived; they are rebuilt on first use
        state["_holder"] = self._holder()  # strong references for the copy; see __setstate__
        state["_sites"] = self.buffer_sites
        state["memo"] = {}
        state["leaves"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        holder = state.pop("_holder")
        sites = state.pop("_sites")
        self.__dict__.update(state)
        self._holder = _dead if holder is None else weakref.ref(holder)
        self._sites = tuple((weakref.ref(m), name) for m, name in sites)

    @property
    def buffer_sites(self) -> tuple[tuple[nn.Module, str], ...]:
        """Where each buffer lives, in ``module.buffers()`` order: (owning module, local name)."""
        return tuple((ref(), name) for ref, name in self._sites)  # type: ignore[misc]

    @property
    def holder(self) -> nn.Module:
        """A module whose ``_parameters`` hold ``flat_param``: the wrapper, or (once the
        wrapper is gone) a bare module over the same dict, so that conversions still apply."""
        holder = self._holder()
        if holder is None:
            holder = nn.Module()
            holder._parameters = self.params
        return holder

    def flat(self) -> Tensor:
        """The current flat parameter (looked up each time: ``.to()`` or FSDP may replace it)."""
        return self.params["flat_param"]  # type: ignore[return-value]

    def own_views(self) -> tuple[Tensor, ...]:
        """Views of ``flat_param``, cached until it is modified in place, moved or replaced."""
        flat = self.params["flat_param"]
        if _is_dynamo():  # the graph reads flat_param itself: no cache, no version checks
            return self.views.traceable(flat)  # type: ignore[arg-type]
        if is_dtensor(flat):
            # Sharded by FSDP's fully_shard, read outside its forward (which gathers it): the
            # full vector, gathered on every read. A collective: every rank must read alike, as
            # they do when they all run the same code; r.unshard() gathers it once instead.
            return self.views.traceable(flat.full_tensor())  # type: ignore[union-attr]
        cache = self._cache
        if (
            cache is not None
            and cache[0] is flat
            and cache[1] == (flat._version, flat.data_ptr(), flat.requires_grad)
        ):
            return cache[2]
        assert flat is not None
        if not self.views.fast_path_ok(flat):
            return self.views.traceable(flat)
        if torch.is_inference_mode_enabled() or type(flat) is not nn.Parameter:
            # Views made in inference mode carry no graph; a plain tensor here is a caller's
            # (torch.func.functional_call(r, {"flat_param": theta})): neither is cached.
            return self.views.fast(flat)
        leaves = self.leaves
        with torch.enable_grad():  # cached views must carry the graph to flat_param
            # (once the unwrapped module's leaves exist, the graph reaches them too: see
            # ViewMaker.own; flat_param alone accumulates in a backward() pass)
            views = self.views.fast(flat) if leaves is None else self.views.own(flat, leaves.params)
        self._cache = (flat, (flat._version, flat.data_ptr(), flat.requires_grad), views)
        return views

    def leaf(self, slot: int) -> Tensor:
        """The module's own parameter ``slot`` as a leaf ``nn.Parameter`` over ``flat_param``
        (see :mod:`._leaves`); a view when ``flat_param`` is not a plain parameter (sharded,
        or a caller's tensor swapped in by ``functional_call``)."""
        flat = self.params["flat_param"]
        if type(flat) is not nn.Parameter:
            return self.own_views()[slot]
        return self._made_leaves(flat).leaf(flat, slot)

    def _made_leaves(self, flat: Tensor) -> Leaves:
        leaves = self.leaves
        if leaves is None:
            with _MAKING:  # (two threads' first uses must not make two sets of leaves)
                leaves = self.leaves
                if leaves is None:
                    leaves = self.leaves = Leaves(self.layout, flat)
                    self._cache = None  # the own views are made again, with the leaves as inputs
        return leaves

    def unwrapped_params(self) -> tuple[Tensor, ...]:
        """What a call of the unwrapped module (or a submodule) binds: :meth:`own_params`,
        whose gradient reaches the leaves (made now: the call is a use of the module)."""
        flat = self.params["flat_param"]
        if type(flat) is nn.Parameter:
            self._made_leaves(flat)
        return self.own_params()

    def own_params(self) -> tuple[Tensor, ...]:
        """What a call with the module's own weights binds: views of ``flat_param`` (gradients
        in one tensor), after any leaf given new storage is copied back; the leaves themselves
        for entries whose ``requires_grad`` was changed on the leaf (``requires_grad_``)."""
        leaves = self.leaves
        flat = self.params["flat_param"]
        if leaves is None or type(flat) is not nn.Parameter:
            return self.own_views()
        leaves.sync(flat)
        views = self.own_views()
        if not leaves.mixed(flat):
            return views
        want = flat.requires_grad
        return tuple(
            view if leaf.requires_grad is want else leaves.leaf(flat, i)  # (hooked if unfrozen)
            for i, (view, leaf) in enumerate(zip(views, leaves.params, strict=True))
        )

    def follow_dtype(self) -> None:
        """After a conversion of ``flat_param`` (``.double()``), a layout of its new dtype."""
        dtype = self.flat().dtype
        if dtype != self.layout.dtype:
            self.layout = dataclasses.replace(self.layout, dtype=dtype)

    @contextmanager
    def converting(self) -> Iterator[None]:
        """Within the block, the root's ``_apply`` does not delegate to the holder."""
        self.applying = True
        try:
            yield
        finally:
            self.applying = False

    def cached_views(self) -> tuple[Tensor, ...] | None:
        """The cached views of ``flat_param``, if any (what binds the module's own weights)."""
        return None if self._cache is None else self._cache[2]

    def writable_view(self, slot: int) -> Tensor:
        """A plain ``narrow`` view of ``flat_param`` for one entry: autograd lets it be written
        in place and then used (its backward builds a full-length gradient: only for the few
        modules that need it)."""
        entry = self.layout.entries[slot]
        return self.flat().narrow(0, entry.offset, entry.numel).view(entry.shape)

    def own_buffers(self) -> list[Tensor]:
        """The module's own buffers, in ``module.buffers()`` order."""
        return [module._buffers[name] for module, name in self.buffer_sites]  # type: ignore[misc]

    def bound_buffers(self) -> list[Tensor] | None:
        """The buffers bound by the innermost binding of this tree, if it bound any."""
        binding = innermost(self)
        return binding.buffers if binding is not None else None


@contextmanager
def bind(
    core: Core,
    params: Sequence[Tensor] | None,
    buffers: list[Tensor] | None,
    guard: bool = False,
) -> Iterator[None]:
    """Within the block, this thread's calls of the tree see ``params`` and ``buffers``."""
    if _is_dynamo():
        outer = CHAIN.top
        CHAIN.top = Binding(core, params, buffers, outer, False, True)
        try:
            yield
        finally:
            CHAIN.top = outer
        return
    top = CHAIN.top
    binding = _binding(core, params, buffers, current(), guard, False)
    token = _ACTIVE.set(binding)
    CHAIN.top = binding
    try:
        yield
    finally:
        _ACTIVE.reset(token)
        # A block may span an ``await``, and asyncio tasks interleave their exits: restore this
        # task's own chain (the one entered from), unless that was made by compiled code.
        CHAIN.top = top if top is not None and top.traced else _active()


def call_bound(
    core: Core,
    params: Sequence[Tensor] | None,
    buffers: list[Tensor] | None,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    guard: bool = False,
) -> Any:
    """``fn(*args, **kwargs)`` with ``params``/``buffers`` bound (:func:`bind`, inlined)."""
    if _is_dynamo():
        with bind(core, params, buffers):
            return fn(*args, **kwargs)
    chain = _active()  # (current(), inlined: this runs on every call, and reads top anyway)
    top = CHAIN.top
    outer = top if top is not chain and top is not None and top.traced else chain
    binding = _new_tuple(Binding, (core, params, buffers, outer, guard, False))  # (inlined)
    token = _ACTIVE.set(binding)
    CHAIN.top = binding
    try:
        return fn(*args, **kwargs)
    finally:
        CHAIN.top = top
        _ACTIVE.reset(token)


def run_in(chain: Binding | None, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """``fn(*args)`` with the bindings ``chain`` active (checkpoint recomputation)."""
    top = CHAIN.top
    token = _ACTIVE.set(chain)
    CHAIN.top = chain
    try:
        return fn(*args)
    finally:
        CHAIN.top = top
        _ACTIVE.reset(token)


# ---- torch.func.functional_call on the unwrapped module ----------------------------------
class _Swapped(list):
    """The params of a binding made by ``torch.func.functional_call`` on the unwrapped module
    (see :func:`swap`): one tensor per slot, the swaps in effect, and what to restore after
    the last is undone."""

    base: tuple[Tensor, ...]  # each slot as it read before the first swap
    swaps: list[tuple[int, str, int, Tensor, Tensor]]  # (module id, name, slot, tensor, previous)
    saved: tuple[Binding | None, Binding | None]  # (_ACTIVE, CHAIN.top) before it


@torch._dynamo.disable  # (run as it is, never compiled as a frame of its own)
def swap(
    core: Core,
    module: nn.Module,
    name: str,
    slot: int,
    value: Tensor,
    previous: Tensor,
    given: Any = None,
) -> None:
    """``setattr(module, name, value)`` by torch's ``swap_tensor``, which ``functional_call``
    uses to put each given tensor in place, run the module, and put the old ones back
    (``previous``: what ``module.name`` read before).

    For a managed name, the tensor is bound in this thread (and asyncio task) only: a binding
    of the tree whose ``slot`` reads ``value``, the others as they read before. Putting back
    the tensor a swap replaced undoes that swap (whatever the order: torch puts them back in
    the order it swapped them); the binding ends with the last one. Unlike a plain module's,
    concurrent calls in other threads see their own tensors, never these. ``given``: (the
    dotted name, every tensor given to the call by name), when torch's caller is found; a
    tied entry must then be given one tensor under all its names.
    """
    binding = innermost(core)
    bound = None if binding is None else binding.params
    key = id(module)
    if isinstance(bound, _Swapped):
        for i in range(len(bound.swaps) - 1, -1, -1):  # putting back what a swap replaced
            k, n, _, _, replaced = bound.swaps[i]
            if k == key and n == name and _same_tensor(replaced, value):
                del bound.swaps[i]
                _settle(bound, slot, binding)
                return
    if given is not None:
        _check_tied(core.layout.entries[slot], value, *given)
    if isinstance(bound, _Swapped):
        swapped = bound
    else:  # (None: the module's own, as its attributes read them: the leaves)
        own = bound if bound is not None else tuple(map(core.leaf, range(len(core.layout))))
        swapped = _Swapped(own)
        swapped.base, swapped.swaps = tuple(own), []
        swapped.saved = (_active(), CHAIN.top)
        buffers = None if binding is None else binding.buffers
        guard = False if binding is None else binding.guard
        binding = _binding(core, swapped, buffers, current(), guard, False)
        _ACTIVE.set(binding)
        CHAIN.top = binding
    for k, n, s, tensor, _ in swapped.swaps:
        if s == slot and tensor is not value and (k, n) != (key, name):
            raise ValueError(
                f"functional_call given two tensors for the tied names of "
                f"{core.layout.entries[slot].name!r}: a wrapped model holds tied weights "
                "once; give them one tensor (tie_weights=True, the default, does)"
            )
    swapped.swaps.append((key, name, slot, value, previous))
    _settle(swapped, slot, binding)


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """The same tensor, or another view of the same memory (code that torch.compile runs reads
    the module's own weights as new views of flat_param)."""
    if a is b:
        return True
    try:
        return (
            a.numel() > 0
            and (a.dtype, a.device, a.shape, a.stride()) == (b.dtype, b.device, b.shape, b.stride())
            and a.data_ptr() == b.data_ptr()
        )
    except RuntimeError:  # (tensors without storage: functorch's, fake ones)
        return False


def _settle(params: _Swapped, slot: int, binding: Binding | None) -> None:
    """``slot`` reads its latest swap still in effect; the binding ends with the last."""
    last = [s[3] for s in params.swaps if s[2] == slot]
    params[slot] = last[-1] if last else params.base[slot]
    if not params.swaps and _active() is binding:
        _ACTIVE.set(params.saved[0])
        CHAIN.top = params.saved[1]


def _check_tied(entry: Any, value: Tensor, full: str, given: dict[str, Any]) -> None:
    """A tied entry given under one of its names must be given the same tensor under all
    (plain torch, with ``tie_weights=False``, would let the other names keep their weights)."""
    names = (entry.name, *entry.aliases)
    if len(names) == 1:
        return
    mine = max((n for n in names if full == n or full.endswith("." + n)), key=len, default=None)
    if mine is None:
        return
    prefix = full[: len(full) - len(mine)]
    others = [prefix + n for n in names if n != mine and given.get(prefix + n) is not value]
    if others:
        raise ValueError(
            f"functional_call given {full!r} but not the same tensor for {others}, tied to it: "
            "a wrapped model holds tied weights once; give one tensor for all of them "
            "(tie_weights=True, the default, does)"
        )
