"""Checkpoints: a flat vector, or a whole :class:`ReparamModule`, as a plain state dict file.

A file from :func:`save_flat` or :func:`save_checkpoint` is a plain safetensors state dict: each
parameter under its name (tied ones once, under their first name) and each buffer under its
name, so ``safetensors.torch.load_file`` and ``model.load_state_dict(..., strict=False)`` read it
without torchreparam; the layout rides along in the header's metadata (see ``_files``). Also
here: conversions between a flat vector and the state dicts of the wrapper and of the unwrapped
module, and the matching of found tensors against an expected layout, which lists every
difference in one error before anything is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._checks import StateDictMismatchError, describe_state_dict_problems
from ._files import (
    Device,
    PathLike,
    _check_layout,
    _header,
    _owned,
    _read,
    _write,
    layout_from_json,
    layout_to_json,
)
from ._layout import FlatLayout
from ._module import ReparamModule

__all__ = [
    "FlatCheckpoint",
    "from_state_dict",
    "layout_from_json",  # these two are defined in _files, and re-exported here
    "layout_to_json",
    "load_checkpoint",
    "load_flat",
    "save_checkpoint",
    "save_flat",
    "to_module_state_dict",
    "to_wrapper_state_dict",
]


class FlatCheckpoint(NamedTuple):
    """What :func:`load_flat` read: ``flat, layout, buffers, metadata = load_flat(path)``.

    Attributes:
        flat: ``(num_params,)``, in ``layout`` order.
        layout: the expected layout if one was given, else the file's.
        buffers: the file's other tensors by name (buffers, parameters outside the vector).
        metadata: the user metadata saved with the file.
    """

    flat: Tensor
    layout: FlatLayout
    buffers: dict[str, Tensor]
    metadata: dict[str, str]


# ---- conversions between state dicts ----------------------------------------------------
def to_module_state_dict(
    flat: Tensor, layout: FlatLayout, *, buffers: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """The unwrapped module's state dict: parameters under all their names, then ``buffers``.

    Args:
        flat: ``(num_params,)``, of ``layout.dtype``.
        layout: the layout of ``flat``.
        buffers: the module's other state (buffers, parameters outside the vector), by name.

    Returns:
        ``{name: tensor}``; the parameters are detached views of ``flat`` (no copy).

    Raises:
        TypeError, ValueError: ``flat`` or ``buffers`` do not fit ``layout``.
    """
    rest = _check_flat_and_buffers(flat, layout, buffers)
    return {**layout.unflatten(flat.detach(), aliases=True), **rest}


def to_wrapper_state_dict(
    flat: Tensor, layout: FlatLayout, *, buffers: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """A :class:`ReparamModule`'s state dict: ``flat_param`` and ``module.<name>`` keys.

    Args, Raises: as :func:`to_module_state_dict`.
    """
    rest = _check_flat_and_buffers(flat, layout, buffers)
    return {"flat_param": flat.detach(), **{f"module.{k}": v for k, v in rest.items()}}


def from_state_dict(
    state_dict: Mapping[str, object], layout: FlatLayout
) -> tuple[Tensor, dict[str, Tensor]]:
    """Split a state dict, the wrapper's or the unwrapped module's, into ``(flat, buffers)``.

    Args:
        state_dict: ``{"flat_param": ..., "module.<name>": ...}``, or the unwrapped module's
            ``{name: tensor}`` (tied parameters under any of their names).
        layout: the expected layout.

    Returns:
        ``flat`` ``(num_params,)`` (the given ``flat_param`` itself, or a new tensor) and the
        other entries, by the module's names.

    Raises:
        StateDictMismatchError: missing or unexpected keys, shapes or dtypes that differ.

    Example:
        >>> import torch
        >>> from torchreparam import ReparamModule
        >>> from torchreparam._checkpoint import from_state_dict
        >>> r = ReparamModule(torch.nn.BatchNorm1d(3))
        >>> flat, buffers = from_state_dict(r.module.state_dict(), r.layout)
        >>> torch.equal(flat, r.flat_param), sorted(buffers)
        (True, ['num_batches_tracked', 'running_mean', 'running_var'])
    """
    _check_layout(layout)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    if "flat_param" not in state_dict:
        return _resolve(state_dict, None, layout, None, "state dict")
    flat = state_dict["flat_param"]
    problem = _misfit("flat_param", flat, (layout.numel,), layout.dtype)
    unexpected = [k for k in state_dict if k != "flat_param" and not k.startswith("module.")]
    _raise_if_any([], unexpected, [problem] if problem else [], "state dict")
    assert isinstance(flat, Tensor)  # (else _misfit found a problem)
    return flat, _unwrapped(state_dict)


# ---- flat vectors and checkpoints -------------------------------------------------------
def save_flat(
    path: PathLike,
    flat: Tensor,
    layout: FlatLayout,
    *,
    buffers: Mapping[str, Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``flat`` as a safetensors state dict, with ``layout`` in its metadata.

    Each parameter is its own contiguous tensor under its name (tied ones once, under their
    first name), then each of ``buffers``. An existing file is replaced atomically.

    Args:
        path: the file to write (conventionally ``*.safetensors``).
        flat: ``(num_params,)``, of ``layout.dtype``, on any device.
        layout: the layout of ``flat``.
        buffers: the module's other state (buffers, parameters outside the vector), by name.
        metadata: ``str -> str`` pairs to store; ``"format"`` and ``"torchreparam.*"`` keys
            are reserved.

    Raises:
        TypeError, ValueError: an argument does not fit (raised before anything is written).
        ImportError: safetensors is not installed.

    Example:
        >>> import os, tempfile, torch
        >>> from torchreparam import ReparamModule
        >>> from torchreparam._checkpoint import load_flat, save_flat
        >>> r = ReparamModule(torch.nn.Linear(3, 2))
        >>> path = os.path.join(tempfile.mkdtemp(), "net.safetensors")
        >>> save_flat(path, r.flat_param, r.layout, metadata={"epoch": "3"})
        >>> flat, layout, buffers, metadata = load_flat(path)
        >>> torch.equal(flat, r.flat_param), layout == r.layout, metadata
        (True, True, {'epoch': '3'})
    """
    rest = _check_flat_and_buffers(flat, layout, buffers)
    header = _header(metadata, layout, "flat")
    views = layout.unflatten(flat.detach().to("cpu"))
    _write(path, {k: _owned(v) for k, v in {**views, **rest}.items()}, header)


def load_flat(
    path: PathLike, *, layout: FlatLayout | None = None, device: Device = "cpu"
) -> FlatCheckpoint:
    """Read a flat vector from a file of :func:`save_flat`, or from any safetensors state dict.

    Args:
        path: the file to read.
        layout: the expected layout: the vector is built in its order, and every difference
            from the file is an error. Required for files without a stored layout.
        device: where to load the tensors.

    Returns:
        a :class:`FlatCheckpoint` ``(flat, layout, buffers, metadata)``.

    Raises:
        StateDictMismatchError: the file does not fit ``layout``: missing or unexpected
            parameters, shapes or dtypes that differ (all listed, sorted).
        ValueError: the file holds a trajectory, or has no layout and none was given, or its
            stored layout cannot be read or calls tensors of the file aliases.
        ImportError: safetensors is not installed.
    """
    if layout is not None:
        _check_layout(layout)
    tensors, stored, metadata = _read(path, device, "flat")
    expected = layout or stored
    if expected is None:
        raise ValueError(
            f"{os.fspath(path)} has no torchreparam layout in its metadata (a plain state "
            "dict); pass layout=FlatLayout.from_module(model) to say how to read it"
        )
    flat, rest = _resolve(tensors, stored, expected, None, "file")
    return FlatCheckpoint(flat, expected, rest, metadata)


def save_checkpoint(
    path: PathLike, r: ReparamModule, *, metadata: Mapping[str, str] | None = None
) -> None:
    """Save a :class:`ReparamModule`: ``flat_param`` and the rest of its state dict.

    Args:
        path: the file to write.
        r: the wrapper to save.
        metadata: ``str -> str`` pairs to store, as for :func:`save_flat`.

    Example:
        >>> import os, tempfile, torch
        >>> from torchreparam import ReparamModule
        >>> from torchreparam._checkpoint import load_checkpoint, save_checkpoint
        >>> r = ReparamModule(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)))
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
        >>> save_checkpoint(path, r, metadata={"step": "100"})
        >>> saved = r.flat_param.detach().clone()
        >>> with torch.no_grad():
        ...     _ = r.flat_param.zero_()
        >>> load_checkpoint(path, r)
        {'step': '100'}
        >>> torch.equal(r.flat_param, saved)
        True
    """
    _check_wrapper(r)
    save_flat(path, r.flat_param, r.layout, buffers=_unwrapped(r.state_dict()), metadata=metadata)


def load_checkpoint(path: PathLike, r: ReparamModule) -> dict[str, str]:
    """Load a file of :func:`save_checkpoint` (or any safetensors state dict of the model).

    Everything is checked against ``r.layout`` and ``r``'s buffers first; only then are the
    values copied into ``r.flat_param`` and the buffers, in place. A model built on the meta
    device (``with torch.device("meta"):``, no storage to copy into) takes the file's tensors
    instead, on the CPU (as ``load_state_dict(..., assign=True)``); move it after.

    Returns:
        the user metadata saved with the file.

    Raises:
        StateDictMismatchError: missing or unexpected names, shapes or dtypes that differ (all
            listed, sorted); ``r`` is left unchanged.
        ValueError: the file's stored layout cannot be read or calls tensors of the file
            aliases; ``r`` is left unchanged.
        ImportError: safetensors is not installed.
    """
    _check_wrapper(r)
    meta = r.flat_param.is_meta  # nothing to copy into: the file's tensors are kept
    tensors, stored, metadata = _read(path, "cpu" if meta else r.flat_param.device, "flat")
    flat, rest = _resolve(tensors, stored, r.layout, _unwrapped(r.state_dict()), "file")
    r.load_state_dict(to_wrapper_state_dict(flat, r.layout, buffers=rest), assign=meta)
    return metadata


def _unwrapped(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A wrapper's state dict without ``flat_param``, by the unwrapped module's names."""
    return {k.removeprefix("module."): v for k, v in state_dict.items() if k != "flat_param"}


# ---- matching what was found against what is expected -----------------------------------
def _resolve(
    found: Mapping[str, Any],
    stored: FlatLayout | None,
    expected: FlatLayout,
    refs: Mapping[str, Tensor] | None,
    source: str,
    lead: tuple[int, ...] = (),
) -> tuple[Tensor, dict[str, Tensor]]:
    """The vector in ``expected`` order, from tensors by name, and the other tensors.

    ``found`` holds the parameters, shaped ``(*lead, *shape)``, and other state. Leftovers that
    ``stored`` names as parameters are unexpected; the others are checked against ``refs`` if
    given (the module's other state). One error lists every problem, before anything is built.
    """
    found = dict(found)
    for entry in stored or ():  # tied parameters are stored once: add their other names
        found.update({a: found[entry.name] for a in entry.aliases if entry.name in found})
    missing: list[str] = []
    mismatched: list[str] = []
    parts, used = _pick(found, expected, lead, missing, mismatched)
    rest = {k: v for k, v in found.items() if k not in used}
    if refs is None:
        unexpected = [k for k in rest if stored is not None and k in stored]
    else:
        unexpected = [k for k in rest if k not in refs]
        missing += [k for k in refs if k not in rest]
        mismatched += [
            problem
            for k, ref in refs.items()
            if k in rest and (problem := _misfit(k, rest[k], ref.shape, ref.dtype))
        ]
    _raise_if_any(missing, unexpected, mismatched, source)
    device = next((t.device for t in found.values() if isinstance(t, Tensor)), None)
    empty = torch.empty(*lead, 0, dtype=expected.dtype, device=device)
    flat = torch.cat(parts, -1) if parts else empty
    return flat, {k: v for k, v in rest.items() if k not in unexpected}


def _pick(
    found: Mapping[str, Any],
    layout: FlatLayout,
    lead: tuple[int, ...],
    missing: list[str],
    mismatched: list[str],
) -> tuple[list[Tensor], set[str]]:
    """Each entry's tensor, reshaped to ``(*lead, numel)``, and every name used."""
    parts, used = [], set()
    for entry in layout:
        names = [n for n in (entry.name, *entry.aliases) if n in found]
        used.update(names)
        if not names:
            missing.append(entry.name)
            continue
        shape = (*lead, *entry.shape)
        problems = [p for n in names if (p := _misfit(n, found[n], shape, layout.dtype, lead))]
        first = found[names[0]]
        if not problems and not all(torch.equal(found[n], first) for n in names[1:]):
            problems.append(f"{', '.join(names)}: tied in the layout but not equal")
        mismatched += problems
        if not problems:
            parts.append(first.reshape(*lead, -1))
    return parts, used


def _misfit(
    name: str, value: object, shape: Sequence[int], dtype: torch.dtype, lead: tuple[int, ...] = ()
) -> str | None:
    """What keeps ``value`` from being a tensor of ``shape`` and ``dtype``, if anything."""
    if not isinstance(value, Tensor):
        return f"{name}: a {type(value).__name__}, expected a tensor"
    if tuple(value.shape) != tuple(shape):
        got, want = tuple(value.shape), tuple(shape)
        if got[: len(lead)] == lead:  # a trajectory's rows: show the parameter's shape
            got, want = got[len(lead) :], want[len(lead) :]
        return f"{name}: shape {got}, expected {want}"
    if value.dtype != dtype:
        return f"{name}: dtype {value.dtype}, expected {dtype}"
    return None


def _raise_if_any(
    missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str], source: str
) -> None:
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(
            f"the {source} does not match (nothing was loaded): "
            + describe_state_dict_problems(missing, unexpected, mismatched)
        )


# ---- argument checks --------------------------------------------------------------------
def _check_wrapper(r: object) -> None:
    if not isinstance(r, ReparamModule):
        raise TypeError(
            f"r must be a ReparamModule, got {type(r).__name__}; for a plain module use "
            "save_flat/load_flat with FlatLayout.from_module(model)"
        )


def _check_flat_and_buffers(
    flat: object, layout: FlatLayout, buffers: Mapping[str, Tensor] | None
) -> dict[str, Tensor]:
    """Raise unless ``flat`` is ``(num_params,)`` of ``layout.dtype`` and ``buffers`` fit."""
    _check_layout(layout)
    problem = _misfit("flat", flat, (layout.numel,), layout.dtype)
    if problem:
        kind = ValueError if "shape" in problem else TypeError
        raise kind(f"{problem}: flat must be ({layout.numel},) of {layout.dtype}, as its layout")
    if buffers is None:
        return {}
    if not isinstance(buffers, Mapping):
        raise TypeError(f"buffers must be a dict {{name: tensor}}, got {type(buffers).__name__}")
    wrong = sorted(k for k, v in buffers.items() if not isinstance(v, Tensor))
    if wrong:
        raise TypeError(f"buffers must hold tensors; {wrong} do not")
    clash = sorted(k for k in buffers if k in layout)
    if clash:
        raise ValueError(f"buffers {clash} have the names of parameters in the layout; rename")
    return dict(buffers)
