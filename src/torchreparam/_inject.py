"""Putting a flat vector into a module: per-thread bindings read through per-class properties.

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
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import is_dtensor
from ._layout import FlatLayout
from ._recompute import guard_recomputation
from ._views import ViewMaker

__all__ = ["CORE_KEY", "Core", "bind", "call_bound", "innermost", "install"]

CORE_KEY = "_torchreparam_core"


# A binding is ``(core, params, buffers, outer, guard)``: the tensors one call (or ``with``
# block) puts into one module tree, linked to the binding it shadows; ``guard`` is set when the
# params are a caller's vector that needs gradients (checkpoint recomputation must see them).
# Tuples: the getters read them on every attribute access; nothing is cheaper to build and index.
_Binding = tuple  # (Core, tuple[Tensor, ...], list[Tensor] | None, _Binding | None, bool)

_ACTIVE: contextvars.ContextVar[_Binding | None] = contextvars.ContextVar(
    "torchreparam_active", default=None
)
_active = _ACTIVE.get
_is_dynamo = torch.compiler.is_dynamo_compiling  # ContextVar is opaque to dynamo: avoid it there


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
        self.views = ViewMaker(layout)
        self.holder = holder  # the module whose ``flat_param`` parameter backs the tree
        # buffers in module.buffers() order: full name -> (owning module, local name)
        self.buffer_names = tuple(buffer_sites)
        self.buffer_sites = tuple(buffer_sites.values())
        self.compiled: tuple[tuple[Tensor, ...], list[Tensor] | None] | None = None
        self.loading_flat = False  # a wrapper-format state dict is being loaded
        self.applying = False  # the holder's _apply is converting the whole tree
        self.writes = False  # a module of the tree writes its weights in place (WRITES_WEIGHTS)
        self._cache: tuple[Tensor, tuple[int, int, bool], tuple[Tensor, ...]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None  # views are derived; they are rebuilt on first use
        state["compiled"] = None
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
        if torch.is_inference_mode_enabled():
            return self.views(flat)  # views made here carry no graph: never cache them
        with torch.enable_grad():  # cached views must carry the graph to flat_param
            views = self.views(flat)
        self._cache = (flat, (flat._version, flat.data_ptr(), flat.requires_grad), views)
        return views

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
    core: Core, params: tuple[Tensor, ...], buffers: list[Tensor] | None, guard: bool = False
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
    params: tuple[Tensor, ...],
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


def _run_in(chain: _Binding | None, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """``fn(*args)`` with the bindings ``chain`` active (checkpoint recomputation)."""
    token = _ACTIVE.set(chain)
    try:
        return fn(*args)
    finally:
        _ACTIVE.reset(token)


_CALL_CODE = call_bound.__code__


# ---- generated classes ------------------------------------------------------------------
# key: (base class, param order as ((name, slot or None), ...), buffers as ((name, slot), ...),
# whether the module is the root of the managed tree, whether it writes its weights in place)
_Spec = tuple[type, tuple[tuple[str, int | None], ...], tuple[tuple[str, int], ...], bool, bool]
_CLASSES: weakref.WeakValueDictionary[_Spec, type] = weakref.WeakValueDictionary()


def _param_property(name: str, slot: int) -> property:
    def fget(module: nn.Module) -> Tensor:
        core: Core = module.__dict__[CORE_KEY]
        if _is_dynamo():
            compiled = core.compiled
            return compiled[0][slot] if compiled is not None else core.own_views()[slot]
        chain = binding = _active()  # the hot path: inlined innermost(core)
        while binding is not None:
            if binding[0] is core:
                if binding[4]:  # a caller's vector that needs gradients
                    guard_recomputation(chain, _run_in, _CALL_CODE)
                return binding[1][slot]
            binding = binding[3]
        return core.own_views()[slot]

    fget.__name__ = name
    return property(fget, doc=f"{name}: a view of the bound flat vector (managed by torchreparam)")


def _writable_param_property(name: str, slot: int) -> property:
    """For modules that write their weights in place in forward (see :data:`WRITES_WEIGHTS`)."""

    def fget(module: nn.Module) -> Tensor:
        core: Core = module.__dict__[CORE_KEY]
        if _is_dynamo():
            compiled = core.compiled
            return compiled[0][slot] if compiled is not None else core.own_views()[slot]
        binding = innermost(core)
        if binding is None or binding[1] is core.cached_views():
            return core.writable_view(slot)  # the module's own: written in place, as plain
        return binding[1][slot].clone()  # a caller's vector is never written

    fget.__name__ = name
    return property(fget, doc=f"{name}: the bound weights (a copy for a caller's vector)")


# Modules whose forward writes their own weights in place: torch.nn.functional.embedding's
# max_norm renormalization. For them a caller's vector is read as a copy (every peer lets it be
# renormalized in place), and the module's own as a plain view of flat_param (which autograd
# lets be written and then used), so the module behaves exactly as a plain one.
WRITES_WEIGHTS: list[Callable[[nn.Module], bool]] = [
    lambda m: isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None,
]


def _buffer_property(name: str, slot: int) -> property:
    def fget(module: nn.Module) -> Tensor:
        bound = module.__dict__[CORE_KEY].bound_buffers()
        return module._buffers[name] if bound is None else bound[slot]  # type: ignore[return-value]

    fget.__name__ = name
    return property(fget, doc=f"{name}: the bound buffer, else the module's own")


def _rebuild(spec: _Spec) -> nn.Module:
    """Unpickling: a bare instance of the generated class for ``spec``."""
    return object.__new__(managed_class(spec))


def managed_class(spec: _Spec) -> type:
    """The generated subclass for ``spec`` (cached: equal specs share one class)."""
    cls = _CLASSES.get(spec)
    if cls is None:
        cls = _make_class(spec)
        _CLASSES[spec] = cls
    return cls


def _make_class(spec: _Spec) -> type:
    base: type[nn.Module]
    base, order, buffers, is_root, writes = spec
    managed = {name: slot for name, slot in order if slot is not None}
    buffer_slots = dict(buffers)

    def __setattr__(self: nn.Module, name: str, value: Any) -> None:
        if name in managed:
            raise AttributeError(
                f"cannot assign to {name!r} of {base.__name__}: it is a view of the flat "
                "parameter managed by torchreparam; write into flat_param (for example with "
                "load_state_dict) or call the wrapper with flat_param=..."
            )
        if name in buffer_slots:
            bound = self.__dict__[CORE_KEY].bound_buffers()
            if bound is not None:  # keep the module's own buffer untouched: rebind instead
                bound[buffer_slots[name]] = value
                return
        base.__setattr__(self, name, value)

    def __reduce_ex__(self: nn.Module, protocol: Any) -> tuple[Any, ...]:
        return (_rebuild, (spec,), self.__getstate__())

    def _save_to_state_dict(
        self: nn.Module, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        own = self.__dict__[CORE_KEY].own_views()
        rest: dict[str, Any] = {}
        base._save_to_state_dict(self, rest, prefix, keep_vars)
        for name, slot in order:  # parameters first, in their registration order
            key = prefix + name
            if slot is not None:
                destination[key] = own[slot] if keep_vars else own[slot].detach()
            elif key in rest:
                destination[key] = rest.pop(key)
        destination.update(rest)

    def _load_from_state_dict(
        self: nn.Module,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        core = self.__dict__[CORE_KEY]
        keys = {prefix + name: slot for name, slot in managed.items()}
        others = {k: v for k, v in state_dict.items() if k not in keys}
        base._load_from_state_dict(
            self, others, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        own = core.own_views()
        for key, slot in keys.items():
            if key not in state_dict:
                if strict and not core.loading_flat:
                    missing_keys.append(key)
                continue
            value = state_dict[key]
            if not isinstance(value, Tensor) or value.shape != own[slot].shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {shape} from "
                    f"checkpoint, the shape in current model is {tuple(own[slot].shape)}."
                )
                continue
            with torch.no_grad():
                own[slot].copy_(value)
            own = core.own_views()  # the copy bumped flat_param's version

    def _apply(self: nn.Module, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        # ``module.double()`` on the unwrapped root converts flat_param too (it holds the data).
        core = self.__dict__[CORE_KEY]
        if not is_root or core.applying:
            return base._apply(self, fn, recurse)
        with core.converting():
            core.holder._apply(fn, recurse=False)  # flat_param (its views follow)
            base._apply(self, fn, recurse)
        return self

    def named_parameters(
        self: nn.Module, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, Tensor]]:
        """The parameters as the module sees them: views of the bound flat vector.

        Called on the unwrapped module (``next(net.parameters()).device`` works, as Hugging
        Face's ``.device`` needs). The wrapper's own ``parameters()`` still yields only
        ``flat_param``: it reads each submodule's ``_parameters``, not this method.
        """
        if not recurse:
            # This module's registered parameters only, as nn.Module: torch's DDP and FSDP walk
            # every submodule with recurse=False for the parameters they manage, which must be
            # flat_param alone (they would otherwise try to own, and reassign, the views).
            yield from nn.Module.named_parameters(self, prefix, recurse, remove_duplicate)
            return
        modules = self.named_modules(prefix=prefix)
        seen: set[int] = set()
        for path, module in modules:
            spec = getattr(type(module), "_torchreparam_spec", None)
            names = [n for n, _ in spec[1]] if spec is not None else list(module._parameters)
            for name in names:
                value = getattr(module, name)
                if value is None or (remove_duplicate and id(value) in seen):
                    continue
                seen.add(id(value))
                yield (f"{path}.{name}" if path else name), value

    namespace: dict[str, Any] = {
        "_apply": _apply,
        "named_parameters": named_parameters,
        "__setattr__": __setattr__,
        "__reduce_ex__": __reduce_ex__,
        "_save_to_state_dict": _save_to_state_dict,
        "_load_from_state_dict": _load_from_state_dict,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "_torchreparam_spec": spec,
    }
    make = _writable_param_property if writes else _param_property
    namespace.update({name: make(name, slot) for name, slot in managed.items()})
    namespace.update({name: _buffer_property(name, slot) for name, slot in buffers})
    return type(base.__name__, (base,), namespace)


# ---- installing on a module tree --------------------------------------------------------
def install(core: Core, root: nn.Module) -> None:
    """Move every managed parameter of ``root`` into ``flat_param`` and make it a property.

    Module by module, each managed parameter is copied into its slice of ``flat_param`` and
    removed from its module, so a parameter nobody else references is freed before the next
    is copied: wrapping needs about one parameter of extra memory, not a copy of the model.
    Buffers become properties too (they stay registered where they are).
    """
    flat = core.flat().detach()
    filled: set[int] = set()
    buffer_slots = {id(m._buffers[n]): i for i, (m, n) in enumerate(core.buffer_sites)}
    index = {name: i for i, e in enumerate(core.layout.entries) for name in (e.name, *e.aliases)}
    for prefix, module in root.named_modules(remove_duplicate=True, prefix=""):
        dot = f"{prefix}." if prefix else ""
        order = tuple(
            (name, index.get(dot + name)) for name, p in module._parameters.items() if p is not None
        )
        buffers = tuple(
            (name, buffer_slots[id(b)]) for name, b in module._buffers.items() if b is not None
        )
        if module is not root and not buffers and all(slot is None for _, slot in order):
            continue  # nothing to manage here (the root is always marked as managed)
        writes = any(predicate(module) for predicate in WRITES_WEIGHTS)
        core.writes = core.writes or writes
        cls = managed_class((type(module), order, buffers, module is root, writes))
        for name, slot in order:
            if slot is None:
                continue
            if slot not in filled:  # a tied parameter is copied at its first occurrence
                entry = core.layout.entries[slot]
                with torch.no_grad():
                    flat[entry.slice].copy_(module._parameters[name].reshape(-1))
                filled.add(slot)
            del module._parameters[name]
        module.__dict__[CORE_KEY] = core
        module.__class__ = cls
