"""The generated classes: a managed module's parameter and buffer names become properties.

For each module that holds a managed parameter (or any buffer), a subclass of its own class is
generated (cached per spec) whose parameter and buffer names are properties reading the
bindings of :mod:`._inject`; ``install`` moves the parameters into ``flat_param`` and swaps the
classes. Their other methods (:mod:`._class_methods`) keep pickling, ``deepcopy``,
``state_dict``, ``load_state_dict``, ``named_parameters`` and ``.to()`` working on the
unwrapped module, and refuse module surgery.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._class_methods import METHODS, Spec, _Derived
from ._guards import (
    ManagedParameters,
)
from ._inject import (
    CHAIN,
    CORE_KEY,
    Core,
    Writable,
    _active,
    _is_dynamo,
    call_bound,
    innermost,
    run_in,
)
from ._recompute import guard_recomputation

__all__ = ["WRITES_WEIGHTS", "install", "managed_class"]

_Spec = Spec

_CALL_CODE = call_bound.__code__  # where a binding is made: recomputation guards stop there


_CLASSES: weakref.WeakValueDictionary[_Spec, type] = weakref.WeakValueDictionary()


def _compiled_param(core: Core, slot: int) -> Tensor:
    """While dynamo traces: the innermost binding (on this thread's chain: see
    ``_inject.current``), else the own views; the recomputation guard is eager-only."""
    binding = innermost(core)
    params = None if binding is None else binding.params
    return params[slot] if params is not None else core.own_views()[slot]


def _param_property(name: str, slot: int) -> property:
    def fget(module: nn.Module) -> Tensor:
        core: Core = module.__dict__[CORE_KEY]
        if _is_dynamo():
            return _compiled_param(core, slot)
        chain = binding = _active()  # the hot path: inlined innermost(core)
        top = CHAIN.top
        if top is not binding and top is not None and top.traced:
            chain = binding = top  # made by compiled code: see _inject.current
        while binding is not None:
            if binding.core is core:
                if binding.guard:  # a caller's vector while autograd records
                    guard_recomputation(chain, run_in, _CALL_CODE)
                params = binding.params  # None: the module's own, as they are now
                return params[slot] if params is not None else core.leaf(slot)
            binding = binding.outer
        return core.leaf(slot)  # not bound: the module's own parameter (a leaf)

    fget.__name__ = name
    return property(
        fget, doc=f"{name}: the bound vector's view, else the module's own parameter (a leaf)"
    )


def _own_forward(base_forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` of the root's generated class: a call of the unwrapped module that no
    binding of its tree covers binds the module's own weights for its duration.

    Outside a call, a weight reads as its leaf ``nn.Parameter`` (as on a plain module); inside,
    the cached views of ``flat_param`` (the same memory), whose gradient a ``backward()``
    accumulates into ``flat_param`` alone, as ``r(x)``'s does (and which reach the leaves when
    ``torch.autograd.grad`` asks for them). Gradients accumulated through the leaves as well
    would write ``flat_param.grad``'s memory under another lock than ``flat_param``'s:
    concurrent backward passes could lose part of a gradient."""
    tracing = torch._C._is_tracing

    @functools.wraps(base_forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if _is_dynamo():  # (compiled code reads flat_param itself: see _compiled_param)
            return base_forward(self, *args, **kwargs)
        binding = _active()
        core: Core = self.__dict__[CORE_KEY]
        if binding is not None and binding[0] is core:  # (binding.core: the hot path, by index)
            return base_forward(self, *args, **kwargs)  # inside a call of the tree: bound
        if core.writes or tracing() or innermost(core) is not None:
            return base_forward(self, *args, **kwargs)
        return call_bound(core, core.unwrapped_params(), None, base_forward, (self, *args), kwargs)

    return forward


def _writable_param_property(name: str, slot: int) -> property:
    """For modules that write their weights in place in forward (see :data:`WRITES_WEIGHTS`)."""

    def fget(module: nn.Module) -> Tensor:
        core: Core = module.__dict__[CORE_KEY]
        if _is_dynamo():
            return _compiled_param(core, slot)
        binding = innermost(core)
        params = None if binding is None else binding.params
        if params is None or params is core.cached_views():
            return core.writable_view(slot)  # the module's own: written in place, as plain
        if type(params) is Writable:
            return params[slot]  # a vector torchreparam made for itself
        return params[slot].clone()  # a caller's vector is never written

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


def _derived_lists(module: nn.Module) -> _Derived:
    """Lists the module keeps of its own parameters (``nn.RNNBase._flat_weights``): plain
    instance attributes that one call would fill with its vector, shared by every thread."""
    names = {id(p): n for n, p in module._parameters.items() if p is not None}
    found = []
    for attr, value in vars(module).items():
        holds_params = isinstance(value, list) and any(id(v) in names for v in value)
        if holds_params and all(v is None or id(v) in names for v in value):
            found.append((attr, tuple(None if v is None else names[id(v)] for v in value)))
    return tuple(found)


def _derived_property(attr: str, names: tuple[str | None, ...]) -> property:
    """The list rebuilt from the parameters as this thread sees them, on every read; writes
    are ignored (the module only ever stores the same derivation there)."""

    def fget(module: nn.Module) -> list[Tensor | None]:
        params = getattr(module.__dict__[CORE_KEY], "params", None)
        if params is None or "flat_param" not in params:
            return [None] * len(names)  # mid-unpickling: the wrapper is not filled in yet
        return [None if name is None else getattr(module, name) for name in names]

    def fset(module: nn.Module, value: object) -> None:
        pass

    return property(fget, fset, doc=f"{attr}: derived from the bound parameters")


_METACLASSES: dict[type, type] = {}


def _metaclass(meta: type) -> type:
    """The metaclass of the generated classes whose base has metaclass ``meta``: calling a
    generated class builds a plain module of its base class. Torch builds new modules that way
    (``type(self)(...)``: ``net[1:]`` of a ``Sequential``, slices of a ``ModuleList``); they
    hold modules of the tree, but are not part of it. Copies and unpickling, which call
    ``__new__`` directly, still make instances of the generated class."""
    made = _METACLASSES.get(meta)
    if made is None:

        def __call__(cls: type, *args: Any, **kwargs: Any) -> Any:
            return cls._torchreparam_spec.base(*args, **kwargs)  # type: ignore[attr-defined]

        made = _METACLASSES[meta] = type(f"Managed{meta.__name__}", (meta,), {"__call__": __call__})
    return made


def _reduce_ex(self: nn.Module, protocol: Any) -> tuple[Any, ...]:
    return (_rebuild, (type(self)._torchreparam_spec,), self.__getstate__())  # type: ignore[attr-defined]


def _rebuild(spec: _Spec) -> nn.Module:
    """Unpickling: a bare instance of the generated class for ``spec``."""
    return object.__new__(managed_class(Spec(*spec)))


def managed_class(spec: _Spec) -> type:
    """The generated subclass for ``spec`` (cached: equal specs share one class)."""
    cls = _CLASSES.get(spec)
    if cls is None:
        cls = _make_class(spec)
        _CLASSES[spec] = cls
    return cls


def _make_class(spec: _Spec) -> type:
    """A subclass of ``spec.base`` with the methods above, and a property per managed
    parameter and buffer name (and per derived list)."""
    base = spec.base
    managed = {name: slot for name, slot in spec.order if slot is not None}
    namespace: dict[str, Any] = {
        **METHODS,
        "__reduce_ex__": _reduce_ex,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "_torchreparam_spec": spec,
        "_torchreparam_managed": managed,
        "_torchreparam_buffers": dict(spec.buffers),
    }
    if spec.is_root and not spec.writes:  # (the root only: a check in every submodule's call
        # would cost every call about 0.3 us per module; a submodule called on its own reads
        # the leaves)
        namespace["forward"] = _own_forward(base.forward)
    make = _writable_param_property if spec.writes else _param_property
    namespace.update({name: make(name, slot) for name, slot in managed.items()})
    namespace.update({name: _buffer_property(name, slot) for name, slot in spec.buffers})
    namespace.update({attr: _derived_property(attr, names) for attr, names in spec.derived})
    return _metaclass(type(base))(base.__name__, (base,), namespace)


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
    # First every class (which may fail, for an exotic class), then every change to the modules
    # (which cannot): a failure leaves the user's model as it was.
    plan = []
    for prefix, module in root.named_modules(remove_duplicate=True, prefix=""):
        dot = f"{prefix}." if prefix else ""
        order = tuple(
            (name, index.get(dot + name)) for name, p in module._parameters.items() if p is not None
        )
        buffers = tuple(
            (name, buffer_slots[id(b)]) for name, b in module._buffers.items() if b is not None
        )
        # Every module gets a class, those without weights too: they refuse module surgery.
        writes = any(predicate(module) for predicate in WRITES_WEIGHTS)
        derived = _derived_lists(module)
        cls = managed_class(Spec(type(module), order, buffers, module is root, writes, derived))
        plan.append((module, cls, order, derived, writes))
    for module, cls, order, derived, writes in plan:
        core.writes = core.writes or writes
        for name, slot in order:
            if slot is None:
                continue
            if slot not in filled:  # a tied parameter is copied at its first occurrence
                entry = core.layout.entries[slot]
                with torch.no_grad():
                    flat[entry.slice].copy_(module._parameters[name].reshape(-1))
                filled.add(slot)
            del module._parameters[name]
        managed = [name for name, slot in order if slot is not None]
        if managed:  # (refuses reading or deleting them there, with what to do instead)
            params = ManagedParameters(
                module._parameters.items(), type(module).__name__, managed, order
            )
            module.__dict__["_parameters"] = params
        for attr, _ in derived:  # the property computes it now; the stale list would shadow it
            del module.__dict__[attr]
        module.__dict__[CORE_KEY] = core
        module.__class__ = cls
