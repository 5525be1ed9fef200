"""The wrapper's state dicts: its own format (``flat_param`` + buffers) and the unwrapped
module's (original keys), translated and checked as a whole before anything is loaded."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import StateDictMismatchError, describe_state_dict_problems
from ._layout import FlatLayout
from ._transaction import Place, Saved

__all__ = [
    "as_given",
    "as_wrapper_format",
    "drop_managed_keys",
    "end_flat_load",
    "restore",
    "snapshot",
]


def _layout(wrapper: nn.Module) -> FlatLayout:
    """The layout of a ReparamModule (typed here without importing it: no import cycle)."""
    layout: FlatLayout = wrapper.__dict__["_core"].layout
    return layout


def as_wrapper_format(wrapper: nn.Module, given: Mapping[str, Any], strict: bool) -> dict[str, Any]:
    """``given`` in this wrapper's keys, after checking every key and shape."""
    expected = wrapper.state_dict(keep_vars=True)
    # The wrapper's keys: flat_param, or (strict=False) some of its buffers; anything else is
    # the unwrapped module's (whose own keys may start with "module." too).
    wrapper_format = "flat_param" in given or (bool(given) and set(given) <= set(expected))
    if wrapper_format:
        ours, shown = dict(given), {k: k for k in given}
        missing: list[str] = []
        mismatched: list[str] = []
    else:
        ours, shown, missing, mismatched = _from_module_format(wrapper, given)
    missing += [shown.get(k, k.removeprefix("module.")) for k in expected if k not in ours]
    unexpected = [shown[k] for k in ours if k not in expected]
    mismatched += [
        f"{shown[k]}: shape {tuple(v.shape)} in the state dict, "
        f"{tuple(expected[k].shape)} in the module"
        for k, v in ours.items()
        if k in expected and isinstance(v, Tensor) and v.shape != expected[k].shape
    ]
    mismatched += [
        f"{shown[k]}: a {type(v).__name__} in the state dict, a tensor is needed"
        for k, v in ours.items()
        if k in expected and not isinstance(v, Tensor)
    ]
    mismatched += [
        f"{shown[k]}: a meta tensor (no data) in the state dict"
        for k, v in ours.items()
        if k in expected and isinstance(v, Tensor) and v.is_meta and not expected[k].is_meta
    ]
    if not strict:
        missing, unexpected = [], []
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(
            "cannot load the state dict (nothing was changed): "
            + describe_state_dict_problems(missing, unexpected, mismatched)
        )
    out: dict[str, Any] = OrderedDict(ours)
    metadata = getattr(given, "_metadata", None)
    if metadata is not None:  # per-module versions (BatchNorm reads them), re-keyed
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k if wrapper_format else f"module.{k}".rstrip("."), v) for k, v in metadata.items()
        )
    return out


def as_given(
    wrapper: nn.Module, given: Mapping[str, Any], ours: Mapping[str, Any], keys: Any
) -> Any:
    """The missing and unexpected keys of a load (``keys``: torch's ``_IncompatibleKeys`` for
    the translated state dict ``ours``) in the format of the state dict the user gave: for one
    of the unwrapped module, the keys a plain module would report (missing ones in the order
    of its own state dict, tied parameters under each of their names)."""
    if set(ours) == set(given):  # the wrapper's own format: as torch reported them
        return keys
    layout = _layout(wrapper)
    absent = {k.removeprefix("module.") for k in keys.missing_keys}  # (buffers: torch's own)
    absent |= {n for e in layout.entries for n in (e.name, *e.aliases) if n not in given}
    module: nn.Module = wrapper.module  # type: ignore[assignment]
    module_keys = list(module.state_dict(keep_vars=True))
    missing = [k for k in module_keys if k in absent]
    unexpected = [k.removeprefix("module.") for k in keys.unexpected_keys]
    return type(keys)(missing, unexpected)


def _from_module_format(
    wrapper: nn.Module, given: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, str], list[str], list[str]]:
    """A state dict of the unwrapped module in this wrapper's keys, with its problems:
    (state dict, wrapper key -> the user's key, missing keys, mismatched shapes).

    The new ``flat_param`` takes the dtype and device of the given parameters when they all
    agree (else ``flat_param``'s own): ``assign=True`` then keeps them, as torch keeps a plain
    module's (and the layout's dtype follows), while a copy (``assign=False``) converts them
    back. On the meta device (a model built under ``torch.device("meta")``) every parameter
    must be given, since ``flat_param`` has no values to keep for the others."""
    layout = _layout(wrapper)
    ours = {"module." + k: v for k, v in given.items() if k not in layout}
    shown = {"module." + k: k for k in given if k not in layout}
    missing, mismatched = [], []
    current = wrapper.get_parameter("flat_param")
    values: list[tuple[slice, Tensor]] = []
    for entry in layout:
        names = [n for n in (entry.name, *entry.aliases) if n in given]
        if not names:
            missing.append(entry.name)
            continue
        value = given[names[0]]
        if not (isinstance(value, Tensor) and tuple(value.shape) == entry.shape):
            found = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            mismatched.append(
                f"{names[0]}: shape {found} in the state dict, {entry.shape} in the module"
            )
        elif value.is_meta and not current.is_meta:
            mismatched.append(f"{names[0]}: a meta tensor (no data) in the state dict")
        elif not all(_same(given[n], value) for n in names[1:]):
            mismatched.append(
                f"{', '.join(names)}: tied in the module (one parameter) but not equal in the "
                "state dict; give them equal values, or only one of the names"
            )
        else:
            values.append((entry.slice, value))
    if current.is_meta and missing and values:
        mismatched.append(
            "flat_param is on the meta device (no data), so every parameter must be given; "
            f"missing {sorted(missing)} (or materialize the module first: r.to_empty(device=...))"
        )
    shown["flat_param"] = "flat_param"
    if mismatched:  # (raised by the caller: no vector is built)
        ours["flat_param"] = current
        return ours, shown, missing, mismatched
    dtypes = {v.dtype for _, v in values}
    devices = {v.device for _, v in values}
    dtype = dtypes.pop() if len(dtypes) == 1 else current.dtype
    if not dtype.is_floating_point and not dtype.is_complex:
        dtype = current.dtype  # (a vector that may require grad holds floats)
    if len(devices) == 1:
        device = devices.pop()
    elif current.is_meta:  # several devices: the first with data (a meta vector has none)
        device = next(v.device for _, v in values if not v.is_meta)
    else:
        device = current.device
    with torch.no_grad():
        if current.is_meta and device.type != "meta":
            flat = torch.empty(current.shape, dtype=dtype, device=device)
        else:
            flat = current.detach().to(dtype=dtype, device=device, copy=True)
        for where, value in values:
            flat[where] = value.reshape(-1)
    ours["flat_param"] = flat
    return ours, shown, missing, mismatched


def _same(a: object, b: Tensor) -> bool:
    """Whether two values given for tied names are one value (the same tensor, or equal)."""
    if a is b:
        return True
    if not (isinstance(a, Tensor) and a.shape == b.shape):
        return False
    return a.is_meta or b.is_meta or bool(torch.equal(a.to(b.device), b))


def drop_managed_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    """The wrapper's state dict holds ``flat_param``, not the views under their own keys."""
    layout = _layout(module)
    for entry in layout:
        for name in (entry.name, *entry.aliases):
            state_dict.pop(f"{prefix}module.{name}", None)


def end_flat_load(module: nn.Module, incompatible_keys: Any) -> None:
    """After loading: ``assign=True`` may have put in a ``flat_param`` of another dtype (as
    torch keeps a state dict's dtype); the layout says so too, as after ``.double()``."""
    core = module.__dict__["_core"]
    core.loading_flat = False
    core.follow_dtype()


def snapshot(wrapper: nn.Module) -> Saved:
    """Every tensor of the wrapper's state: the objects, and copies of their values."""
    places: list[Place] = []
    for key in wrapper.state_dict(keep_vars=True):
        owner, _, name = key.rpartition(".")
        module = wrapper.get_submodule(owner)
        for slots in (module._parameters, module._buffers):  # (assign=True may replace either)
            if name in slots:
                places.append((slots, name, True))  # type: ignore[arg-type]
    return Saved(places)


def restore(wrapper: nn.Module, saved: Saved) -> None:
    """Put back what :func:`snapshot` saw: the same tensor objects, holding the same values."""
    saved.restore()
    wrapper.__dict__["_core"].follow_dtype()  # the layout's dtype as it was, too
