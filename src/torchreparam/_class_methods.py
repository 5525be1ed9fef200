"""The methods of the generated classes (see :mod:`._classes`), and the :class:`Spec` each
class is made from: what keeps module surgery refused, and ``setattr``, ``deepcopy``,
``state_dict``, ``load_state_dict``, ``zero_grad``, ``named_parameters`` and ``.to()`` working,
on the unwrapped module and its submodules.

Each method reads what its class was made from: ``_torchreparam_spec`` (a :class:`Spec`) and
the two lookups derived from it once, ``_torchreparam_managed`` (parameter name -> slot in
``flat_param``) and ``_torchreparam_buffers`` (buffer name -> slot among the tree's buffers).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import _named_member_accessor

from ._guards import PARAMETRIZATIONS, TREE_COPY, check_child, check_new_tensor, plain_copy
from ._inject import CORE_KEY, Core, _is_dynamo, swap

__all__ = ["METHODS", "Spec"]

# torch.func.functional_call assigns each given tensor through this function (see _inject.swap)
_SWAP_CODE = getattr(getattr(_named_member_accessor, "swap_tensor", None), "__code__", None)
_SWAP_DICT = getattr(_named_member_accessor.NamedMemberAccessor, "swap_tensors_dict", None)
_SWAP_DICT_CODE = getattr(_SWAP_DICT, "__code__", None)


def _swapped_by_torch() -> tuple[str, dict[str, Any]] | bool | None:
    """Whether the caller of the generated ``__setattr__`` is torch's ``swap_tensor``; if so,
    and ``swap_tensors_dict`` called it, (the dotted name, every tensor given by name)."""
    if _is_dynamo():
        return False  # (frames are opaque to dynamo: refused, see __setattr__)
    frame = sys._getframe(2)
    if frame.f_code is not _SWAP_CODE:
        return False
    for _ in range(3):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            break
        if frame.f_code is _SWAP_DICT_CODE:
            found = frame.f_locals
            return found.get("name"), found.get("named_tensors")  # type: ignore[return-value]
    return None


_Derived = tuple[tuple[str, tuple[str | None, ...]], ...]


class Spec(NamedTuple):
    """What a generated class is made from (and cached by: equal specs share one class)."""

    base: type[nn.Module]  # the module's own class
    order: tuple[tuple[str, int | None], ...]  # its parameters: (name, slot in flat_param or None)
    buffers: tuple[tuple[str, int], ...]  # its buffers: (name, slot among the tree's buffers)
    is_root: bool  # the root of the wrapped tree
    writes: bool  # writes its weights in place in forward (WRITES_WEIGHTS)
    derived: _Derived  # lists derived from parameters: ((attribute, (name or None, ...)), ...)


def _params_first(
    missing: list[str], start: int, prefix: str, order: tuple[tuple[str, int | None], ...]
) -> None:
    """A module's missing keys as torch reports them: parameters in registration order, then
    buffers (``missing[start:]`` holds this module's)."""
    rank = {prefix + name: i for i, (name, _) in enumerate(order)}
    missing[start:] = sorted(missing[start:], key=lambda k: rank.get(k, len(rank)))  # (stable)


def _materialize(core: Core, state: dict[str, Any], prefix: str) -> None:
    """``load_state_dict(..., assign=True)`` of the unwrapped root while ``flat_param`` is on
    the meta device: a new ``flat_param`` of the given values (their dtype and device when they
    agree, as torch keeps a plain module's); refused if some parameter is not given."""
    flat, values, missing = core.flat(), [], []
    for entry in core.layout.entries:
        keys = [prefix + n for n in (entry.name, *entry.aliases) if prefix + n in state]
        value = state[keys[0]] if keys else None
        if isinstance(value, Tensor) and not value.is_meta and tuple(value.shape) == entry.shape:
            values.append(value)
        else:
            missing.append(prefix + entry.name)
    if missing:  # (raised before any module of the tree loaded anything)
        raise ValueError(
            "cannot load the state dict (nothing was changed): flat_param is on the meta "
            "device (no data), so assign=True needs every parameter (with data, of its shape); "
            f"missing {missing} (or materialize the module first: r.to_empty(device=...))"
        )
    kinds = {(v.dtype, v.device) for v in values}
    first = values[0].device if values else torch.device("cpu")
    dtype, device = next(iter(kinds)) if len(kinds) == 1 else (flat.dtype, first)
    with torch.no_grad():
        parts = [v.detach().reshape(-1).to(dtype=dtype, device=device) for v in values]
        data = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
    core.params["flat_param"] = nn.Parameter(data, requires_grad=flat.requires_grad)
    core.follow_dtype()


def _check_conversion(module: nn.Module, fn: Callable[[Tensor], Tensor], name: str) -> None:
    """Refuse converting one submodule's managed weights (``net[0].half()``): one flat vector
    has one dtype and one device. ``fn`` is tried on an empty view of one of them."""
    with torch.no_grad():
        probe = getattr(module, name).detach().reshape(-1)[:0]
        converted = fn(probe)
    if (converted.dtype, converted.device) != (probe.dtype, probe.device):
        raise ValueError(
            f"converting {type(module).__name__} alone to {converted.dtype} on "
            f"{converted.device}: its weights are part of flat_param, which has one dtype and "
            "one device; convert the whole model (r.to(...) or r.module.to(...)) instead"
        )


def _spec(module: nn.Module) -> Spec:
    return type(module)._torchreparam_spec  # type: ignore[attr-defined,no-any-return,unused-ignore]


def _setattr(self: nn.Module, name: str, value: Any) -> None:
    cls = type(self)
    base: type[nn.Module] = cls._torchreparam_spec.base  # type: ignore[attr-defined]
    managed: dict[str, int] = cls._torchreparam_managed  # type: ignore[attr-defined]
    if name in managed:
        by_torch = isinstance(value, Tensor) and _swapped_by_torch()
        if by_torch is not False:  # torch.func.functional_call: bound in this thread only
            previous = getattr(self, name)
            swap(self.__dict__[CORE_KEY], self, name, managed[name], value, previous, by_torch)
            return
        if value is getattr(self, name):
            return  # the same parameter again (Hugging Face's tie_weights on tied weights)
        if _is_dynamo():
            raise ValueError(
                f"assigning {name!r} of {base.__name__} in code that torch.compile traces "
                "(torch.func.functional_call of the unwrapped module, for one): its values "
                "live in flat_param; call the wrapper with flat_param=... instead, or call "
                "functional_call outside the compiled function"
            )
        raise AttributeError(
            f"cannot assign to {name!r} of {base.__name__}: its values live in the flat "
            "parameter managed by torchreparam; write into it in place (with torch.no_grad(): "
            f"module.{name}.copy_(value)), load a state dict, or call the wrapper with "
            "flat_param=..."
        )
    buffer_slots: dict[str, int] = cls._torchreparam_buffers  # type: ignore[attr-defined]
    if name in buffer_slots:
        bound = self.__dict__[CORE_KEY].bound_buffers()
        # (a DataParallel replica's own copies, set by replicate(), are never rebound)
        if bound is not None and not self.__dict__.get("_is_replica"):  # rebind instead
            bound[buffer_slots[name]] = value
            return
    if isinstance(value, nn.Module) or name in self.__dict__.get("_modules", ()):
        check_child(self, name, value, "assigning")
    elif isinstance(value, nn.Parameter) and name not in self._parameters:
        check_new_tensor(self, name, "parameter")
    base.__setattr__(self, name, value)


def _delattr(self: nn.Module, name: str) -> None:
    base = _spec(self).base
    if name in self._modules:
        check_child(self, name, None, "deleting")
    if name in type(self)._torchreparam_managed:  # type: ignore[attr-defined]
        raise AttributeError(
            f"cannot delete {name!r} of {base.__name__}: its values live in flat_param "
            "(the layout of a wrapped model is fixed); change the model before wrapping"
        )
    base.__delattr__(self, name)


def _add_module(self: nn.Module, name: str, module: nn.Module | None) -> None:
    check_child(self, name, module, "adding")
    _spec(self).base.add_module(self, name, module)


def _register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
    if name not in self._parameters:
        check_new_tensor(self, name, "parameter")
    _spec(self).base.register_parameter(self, name, param)


def _register_buffer(
    self: nn.Module, name: str, tensor: Tensor | None, persistent: bool = True
) -> None:
    if name not in self._buffers:
        check_new_tensor(self, name, "buffer")
    _spec(self).base.register_buffer(self, name, tensor, persistent)


def _zero_grad(self: nn.Module, set_to_none: bool = True) -> None:
    spec = _spec(self)
    spec.base.zero_grad(self, set_to_none)  # (the leaves' grads: views of flat_param.grad)
    if spec.is_root:  # flat_param's own gradient too, as nn.Module.zero_grad treats a parameter
        nn.Module.zero_grad(self.__dict__[CORE_KEY].holder, set_to_none)


def _deepcopy(self: nn.Module, memo: dict[int, Any]) -> nn.Module:
    core = self.__dict__[CORE_KEY]
    holder = core._holder()  # (a copy of the wrapper copies the tree: it is in memo then)
    in_tree = memo.get(TREE_COPY) or id(core) in memo or id(holder) in memo  # type: ignore[call-overload,unused-ignore]
    if not in_tree:  # the unwrapped module, or one submodule: a plain module, its weights
        return plain_copy(self, memo)
    memo[TREE_COPY] = True  # type: ignore[index,unused-ignore]
    base_copy = getattr(_spec(self).base, "__deepcopy__", None)
    if base_copy is not None:  # (parametrized classes define their own)
        return base_copy(self, memo)  # type: ignore[no-any-return,unused-ignore]
    return copy._reconstruct(self, memo, *self.__reduce_ex__(4))  # type: ignore[attr-defined,no-any-return,unused-ignore]


def _save_to_state_dict(
    self: nn.Module, destination: dict[str, Any], prefix: str, keep_vars: bool
) -> None:
    core = self.__dict__[CORE_KEY]
    own = core.own_params()  # (leaves given new storage are copied back first)
    if keep_vars and core.leaves is not None:  # the parameters themselves, as plain torch
        own = tuple(core.leaf(slot) for slot in range(len(own)))
    rest: dict[str, Any] = {}
    spec = _spec(self)
    spec.base._save_to_state_dict(self, rest, prefix, keep_vars)
    for name, slot in spec.order:  # parameters first, in their registration order
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
    spec = _spec(self)
    if spec.is_root and core.flat().is_meta and local_metadata.get("assign_to_params_buffers"):
        _materialize(core, state_dict, prefix)
    managed: dict[str, int] = type(self)._torchreparam_managed  # type: ignore[attr-defined]
    keys = {prefix + name: slot for name, slot in managed.items()}
    others = {k: v for k, v in state_dict.items() if k not in keys}
    start = len(missing_keys)
    spec.base._load_from_state_dict(
        self, others, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    )
    flat = core.flat().detach()  # copied into directly: no views to rebuild per key
    for key, slot in keys.items():
        if key not in state_dict:
            if strict and not core.loading_flat:
                missing_keys.append(key)
            continue
        value, entry = state_dict[key], core.layout.entries[slot]
        if not isinstance(value, Tensor) or tuple(value.shape) != entry.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            error_msgs.append(
                f"size mismatch for {key}: copying a param with shape {shape} from "
                f"checkpoint, the shape in current model is {entry.shape}."
            )
            continue
        with torch.no_grad():
            flat[entry.slice].copy_(value.reshape(-1))
    _params_first(missing_keys, start, prefix, spec.order)


def _apply(self: nn.Module, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
    # ``module.double()`` on the unwrapped root converts flat_param too (it holds the data).
    core = self.__dict__[CORE_KEY]
    spec = _spec(self)
    managed = type(self)._torchreparam_managed  # type: ignore[attr-defined]
    if not spec.is_root and managed and not core.applying:
        _check_conversion(self, fn, next(iter(managed)))
    if not spec.is_root or core.applying:
        return spec.base._apply(self, fn, recurse)
    with core.converting():
        core.holder._apply(fn, recurse=False)  # flat_param (its views follow)
        spec.base._apply(self, fn, recurse)
    return self


def _named_parameters(
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
    modules = self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate)
    seen: set[int] = set()
    for path, module in modules:
        spec = getattr(type(module), "_torchreparam_spec", None)
        names = [n for n, _ in spec.order] if spec is not None else list(module._parameters)
        for name in names:
            value = getattr(module, name)
            if value is None or (remove_duplicate and id(value) in seen):
                continue
            seen.add(id(value))
            yield (f"{path}.{name}" if path else name), value


METHODS: dict[str, Any] = {
    "_apply": _apply,
    "named_parameters": _named_parameters,
    "__setattr__": _setattr,
    "__delattr__": _delattr,
    "add_module": _add_module,
    "register_module": _add_module,
    "register_parameter": _register_parameter,
    "register_buffer": _register_buffer,
    "zero_grad": _zero_grad,
    "__deepcopy__": _deepcopy,
    "_save_to_state_dict": _save_to_state_dict,
    "_load_from_state_dict": _load_from_state_dict,
    "parametrizations": PARAMETRIZATIONS,
}
