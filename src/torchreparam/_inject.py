"""Putting a flat vector into a module: per-thread bindings, and the core of a wrapped tree
(the generated classes that read them are in :mod:`._classes`).

Each submodule that holds a managed parameter (or any buffer) gets a generated subclass of its
own class whose parameter and buffer names are properties. A property looks up the innermost
binding of this module tree in a ``ContextVar`` (so each thread, and each nested call, sees its
own tensors) and otherwise returns the module's own weights: cached views of ``flat_param``.
Nothing on the module is ever swapped in or out, so nothing has to be put back after a call,
whatever it raised.

``torch.compile`` cannot trace ``ContextVar``; while compiling, bindings live on the core
instead (the compiled graph takes the tensors as inputs, so it needs no per-thread state).
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import is_dtensor
from ._layout import FlatLayout
from ._views import ViewMaker

__all__ = ["CORE_KEY", "Core", "Writable", "bind", "call_bound", "innermost", "run_in"]

CORE_KEY = "_torchreparam_core"


# A binding is ``(core, params, buffers, outer, guard)``: the tensors one call (or ``with``
# block) puts into one module tree, linked to the binding it shadows; ``guard`` is set when the
# params are a caller's vector bound while autograd records (checkpoint recomputation must see
# them).
# Tuples: the getters read them on every attribute access; nothing is cheaper to build and index.
_Binding = tuple  # (Core, tuple[Tensor, ...], list[Tensor] | None, _Binding | None, bool)

_ACTIVE: contextvars.ContextVar[_Binding | None] = contextvars.ContextVar(
    "torchreparam_active", default=None
)
_active = _ACTIVE.get
_is_dynamo = torch.compiler.is_dynamo_compiling  # ContextVar is opaque to dynamo: avoid it there


class Writable(tuple):
    """Bound views of a vector torchreparam made for itself (``fresh_flat_param``): modules
    that write their weights in place may write into them (a caller's vector is copied)."""

    __slots__ = ()


def innermost(core: Core) -> _Binding | None:
    """This thread's innermost binding of ``core``'s tree, if any."""
    if _is_dynamo():
        compiled = core.compiled
        return None if compiled is None else (core, compiled[0], compiled[1], None, False)
    binding = _active()
    while binding is not None and binding[0] is not core:
        binding = binding[3]
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
        self.holder = holder  # the module whose ``flat_param`` parameter backs the tree
        # buffers in module.buffers() order: full name -> (owning module, local name)
        self.buffer_names = tuple(buffer_sites)
        self.buffer_sites = tuple(buffer_sites.values())
        self.compiled: tuple[tuple[Tensor, ...] | None, list[Tensor] | None] | None = None
        self.loading_flat = False  # a wrapper-format state dict is being loaded
        self.applying = False  # the holder's _apply is converting the whole tree
        self.writes = False  # a module of the tree writes its weights in place (WRITES_WEIGHTS)
        self._cache: tuple[Tensor, tuple[int, int, bool], tuple[Tensor, ...]] | None = None
        self.memo: dict[str, Any] = {}  # what the layers above derive from the tree, to reuse

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None  # views are derived; they are rebuilt on first use
        state["compiled"] = None
        state["memo"] = {}
        return state

    def flat(self) -> Tensor:
        """The current flat parameter (looked up each time: ``.to()`` or FSDP may replace it)."""
        return self.holder._parameters["flat_param"]  # type: ignore[return-value]

    def own_views(self) -> tuple[Tensor, ...]:
        """Views of ``flat_param``, cached until it is modified in place, moved or replaced."""
        flat = self.holder._parameters["flat_param"]
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
        with torch.enable_grad():  # cached views must carry the graph to flat_param
            views = self.views.fast(flat)
        self._cache = (flat, (flat._version, flat.data_ptr(), flat.requires_grad), views)
        return views

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
        return binding[2] if binding is not None else None


@contextmanager
def bind(
    core: Core,
    params: tuple[Tensor, ...] | None,
    buffers: list[Tensor] | None,
    guard: bool = False,
) -> Iterator[None]:
    """Within the block, this thread's calls of the tree see ``params`` and ``buffers``."""
    if _is_dynamo():
        outer = core.compiled
        core.compiled = (params, buffers)
        try:
            yield
        finally:
            core.compiled = outer
        return
    token = _ACTIVE.set((core, params, buffers, _active(), guard))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def call_bound(
    core: Core,
    params: tuple[Tensor, ...] | None,
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
    token = _ACTIVE.set((core, params, buffers, _active(), guard))
    try:
        return fn(*args, **kwargs)
    finally:
        _ACTIVE.reset(token)


def run_in(chain: _Binding | None, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """``fn(*args)`` with the bindings ``chain`` active (checkpoint recomputation)."""
    token = _ACTIVE.set(chain)
    try:
        return fn(*args)
    finally:
        _ACTIVE.reset(token)
