"""Checkpoint files: a flat vector and its layout as a safetensors file anyone can read.

A file from :func:`save_flat` or :func:`save_checkpoint` is a plain state dict: each parameter
under its name (tied ones once, under their first name) and each buffer under its name, so
``safetensors.torch.load_file`` and ``model.load_state_dict(..., strict=False)`` read it without
torchreparam. The layout (names, shapes, offsets, aliases, dtype) rides along as JSON in the
header's metadata, under ``"torchreparam.layout"``. A weight trajectory
(:func:`save_trajectory`) is one ``(steps, num_params)`` tensor, ``"trajectory"``, with the same
metadata. safetensors is optional: ``pip install safetensors`` (or ``torchreparam[checkpoint]``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._checks import StateDictMismatchError, describe_state_dict_problems
from ._layout import FlatLayout, LayoutEntry
from ._module import ReparamModule

try:
    from safetensors import safe_open
    from safetensors.torch import save_file
except ImportError as err:  # pragma: no cover - the tests monkeypatch _SAFETENSORS_ERROR
    _SAFETENSORS_ERROR: ImportError | None = err
else:
    _SAFETENSORS_ERROR = None

__all__ = [
    "FlatCheckpoint",
    "Trajectory",
    "from_state_dict",
    "layout_from_json",
    "layout_to_json",
    "load_checkpoint",
    "load_flat",
    "load_trajectory",
    "save_checkpoint",
    "save_flat",
    "save_trajectory",
    "to_module_state_dict",
    "to_wrapper_state_dict",
]

LAYOUT_VERSION = 1
_LAYOUT_KEY, _KIND_KEY = "torchreparam.layout", "torchreparam.kind"
_TRAJECTORY, _STEPS = "trajectory", "steps"
PathLike = str | os.PathLike[str]
Device = str | torch.device


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


class Trajectory(NamedTuple):
    """What :func:`load_trajectory` read: ``flats, layout, steps, metadata = ...``.

    Attributes:
        flats: ``(steps, num_params)``, one flat vector per row, in ``layout`` order.
        layout: the expected layout if one was given, else the file's.
        steps: ``(steps,)`` int64 step indices, or ``None`` if none were saved.
        metadata: the user metadata saved with the file.
    """

    flats: Tensor
    layout: FlatLayout
    steps: Tensor | None
    metadata: dict[str, str]


# ---- the layout as JSON -----------------------------------------------------------------
def layout_to_json(layout: FlatLayout) -> str:
    """The layout as JSON: ``version``, ``dtype`` (as ``"float32"``), ``numel``, ``entries``.

    Example:
        >>> import torch
        >>> from torchreparam import FlatLayout
        >>> from torchreparam._checkpoint import layout_from_json, layout_to_json
        >>> layout = FlatLayout.from_module(torch.nn.Linear(3, 2))
        >>> layout_to_json(layout)[:60]
        '{"version":1,"dtype":"float32","numel":8,"entries":[{"name":'
        >>> layout_from_json(layout_to_json(layout)) == layout
        True
    """
    _check_layout(layout)
    entries = [
        {"name": e.name, "shape": list(e.shape), "offset": e.offset, "aliases": list(e.aliases)}
        for e in layout
    ]
    head = {"version": LAYOUT_VERSION, "dtype": str(layout.dtype).removeprefix("torch.")}
    return json.dumps({**head, "numel": layout.numel, "entries": entries}, separators=(",", ":"))


def layout_from_json(text: str) -> FlatLayout:
    """The :class:`FlatLayout` that :func:`layout_to_json` wrote.

    Raises:
        ValueError: ``text`` is not a layout's JSON, or was written by a newer version.
    """
    try:
        data = json.loads(text)
        if data["version"] != LAYOUT_VERSION:
            raise ValueError(
                f"version {data['version']!r}, and this torchreparam reads version "
                f"{LAYOUT_VERSION}; upgrade torchreparam to read newer files"
            )
        dtype = getattr(torch, data["dtype"]) if isinstance(data["dtype"], str) else None
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {data['dtype']!r}")
        layout = FlatLayout(tuple(_entry_from_json(e) for e in data["entries"]), dtype)
        if layout.numel != data["numel"]:
            raise ValueError(f"numel {data['numel']!r}, but the entries hold {layout.numel}")
    except (TypeError, KeyError, AttributeError, ValueError) as error:
        raise ValueError(f"not a torchreparam layout JSON: {error}") from None
    return layout


def _entry_from_json(data: Mapping[str, Any]) -> LayoutEntry:
    name, shape, offset, aliases = data["name"], data["shape"], data["offset"], data["aliases"]
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in (offset, *shape)):
        raise ValueError(f"entry {name!r}: shape and offset must be non-negative integers")
    if not isinstance(aliases, list) or not all(isinstance(n, str) for n in (name, *aliases)):
        raise ValueError(f"entry {name!r}: name and aliases must be strings")
    return LayoutEntry(name, tuple(shape), offset, tuple(aliases))


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
    state_dict: Mapping[str, Any], layout: FlatLayout
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
    return flat, {k.removeprefix("module."): v for k, v in state_dict.items() if k != "flat_param"}


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
        ValueError: the file holds a trajectory, or has no layout and none was given.
        ImportError: safetensors is not installed.
    """
    if layout is not None:
        _check_layout(layout)
    tensors, meta = _read(path, device)
    stored = _stored_layout(meta, path, "flat")
    expected = layout or stored
    if expected is None:
        raise ValueError(
            f"{os.fspath(path)} has no torchreparam layout in its metadata (a plain state "
            "dict); pass layout=FlatLayout.from_module(model) to say how to read it"
        )
    flat, rest = _resolve(tensors, stored, expected, None, "file")
    return FlatCheckpoint(flat, expected, rest, _user_metadata(meta))


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
    save_flat(path, r.flat_param, r.layout, buffers=_rest_of(r), metadata=metadata)


def load_checkpoint(path: PathLike, r: ReparamModule) -> dict[str, str]:
    """Load a file of :func:`save_checkpoint` (or any safetensors state dict of the model).

    Everything is checked against ``r.layout`` and ``r``'s buffers first; only then are the
    values copied into ``r.flat_param`` and the buffers, in place.

    Returns:
        the user metadata saved with the file.

    Raises:
        StateDictMismatchError: missing or unexpected names, shapes or dtypes that differ (all
            listed, sorted); ``r`` is left unchanged.
        ImportError: safetensors is not installed.
    """
    _check_wrapper(r)
    tensors, meta = _read(path, r.flat_param.device)
    stored = _stored_layout(meta, path, "flat")
    flat, rest = _resolve(tensors, stored, r.layout, _rest_of(r), "file")
    r.load_state_dict(to_wrapper_state_dict(flat, r.layout, buffers=rest))
    return _user_metadata(meta)


def _rest_of(r: ReparamModule) -> dict[str, Tensor]:
    """``r``'s state dict without ``flat_param``, by the unwrapped module's names."""
    state = r.state_dict()
    return {k.removeprefix("module."): v for k, v in state.items() if k != "flat_param"}


# ---- trajectories -----------------------------------------------------------------------
def save_trajectory(
    path: PathLike,
    flats: Tensor | Sequence[Tensor],
    layout: FlatLayout,
    *,
    steps: Tensor | Sequence[int] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a weight trajectory as one ``(steps, num_params)`` tensor, with its layout.

    Args:
        path: the file to write.
        flats: ``(steps, num_params)``, or a sequence of ``(num_params,)`` tensors.
        layout: the layout of each vector.
        steps: ``(steps,)`` integer step indices (for example the epochs saved).
        metadata: ``str -> str`` pairs to store, as for :func:`save_flat`.

    Raises:
        TypeError, ValueError: an argument does not fit (raised before anything is written).
        ImportError: safetensors is not installed.

    Example:
        >>> import os, tempfile, torch
        >>> from torchreparam import FlatLayout
        >>> from torchreparam._checkpoint import load_trajectory, save_trajectory
        >>> layout = FlatLayout.from_module(torch.nn.Linear(3, 2))
        >>> path = os.path.join(tempfile.mkdtemp(), "expert.safetensors")
        >>> flats = [torch.randn(8) for _ in range(5)]  # e.g. one per epoch
        >>> save_trajectory(path, flats, layout, steps=range(0, 50, 10))
        >>> loaded, _, steps, _ = load_trajectory(path, layout=layout)
        >>> loaded.shape, steps.tolist()
        (torch.Size([5, 8]), [0, 10, 20, 30, 40])
    """
    _check_layout(layout)
    stacked = _stack(flats, layout)
    tensors = {_TRAJECTORY: stacked.detach().to("cpu").contiguous()}
    if steps is not None:
        tensors[_STEPS] = _check_steps(steps, len(stacked))
    _write(path, tensors, _header(metadata, layout, "trajectory"))


def load_trajectory(
    path: PathLike, *, layout: FlatLayout | None = None, device: Device = "cpu"
) -> Trajectory:
    """Read a file of :func:`save_trajectory`.

    Args:
        path: the file to read.
        layout: the expected layout: columns are put in its order if the file's differs, and
            every other difference is an error.
        device: where to load the tensors.

    Returns:
        a :class:`Trajectory` ``(flats, layout, steps, metadata)``.

    Raises:
        StateDictMismatchError: the file does not fit ``layout`` (every difference listed).
        ValueError: the file is not a trajectory.
        ImportError: safetensors is not installed.
    """
    if layout is not None:
        _check_layout(layout)
    tensors, meta = _read(path, device)
    stored = _stored_layout(meta, path, "trajectory")
    traj = tensors.get(_TRAJECTORY)
    if stored is None or traj is None or traj.dim() != 2 or traj.shape[1] != stored.numel:
        raise ValueError(
            f"{os.fspath(path)} is not a weight trajectory: it needs a (steps, num_params) "
            "tensor 'trajectory' and the layout in its metadata; write it with save_trajectory"
        )
    expected = layout or stored
    if expected != stored:
        found = stored.unflatten(traj, aliases=False)
        traj, _ = _resolve(found, stored, expected, None, "file", lead=(len(traj),))
    return Trajectory(traj, expected, tensors.get(_STEPS), _user_metadata(meta))


def _stack(flats: Tensor | Sequence[Tensor], layout: FlatLayout) -> Tensor:
    """``flats`` as one ``(steps, num_params)`` tensor, after checking it fits ``layout``."""
    if isinstance(flats, Tensor):
        if flats.dim() != 2 or flats.shape[1] != layout.numel:
            raise ValueError(f"flats: shape {tuple(flats.shape)}, expected (steps, {layout.numel})")
        if flats.dtype != layout.dtype:
            raise TypeError(f"flats: dtype {flats.dtype}, expected {layout.dtype}, the layout's")
        return flats
    if isinstance(flats, str) or not isinstance(flats, Sequence) or len(flats) == 0:
        raise TypeError(
            "flats must be a (steps, num_params) tensor or a non-empty sequence of "
            f"(num_params,) tensors, got {type(flats).__name__}"
        )
    row = (layout.numel,)
    bad = [p for i, f in enumerate(flats) if (p := _misfit(f"flats[{i}]", f, row, layout.dtype))]
    if bad:
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"flats do not fit the layout: {'; '.join(bad[:3])}{more}")
    return torch.stack([f.detach() for f in flats])


def _check_steps(steps: Tensor | Sequence[int], count: int) -> Tensor:
    values = torch.as_tensor(steps if isinstance(steps, Tensor) else list(steps))
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"steps must be integers, got dtype {values.dtype}")
    if values.shape != (count,):
        raise ValueError(f"steps has shape {tuple(values.shape)}; expected ({count},), one a row")
    return values.to("cpu", torch.int64).contiguous()


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
def _check_layout(layout: object) -> None:
    if not isinstance(layout, FlatLayout):
        raise TypeError(
            "layout must be a FlatLayout (for example r.layout or FlatLayout.from_module(model))"
            f", got {type(layout).__name__}"
        )


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


def _header(metadata: Mapping[str, str] | None, layout: FlatLayout, kind: str) -> dict[str, str]:
    """The safetensors metadata: the user's pairs, the kind of file and its layout."""
    if metadata is not None and not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str -> str, got {type(metadata).__name__}")
    given = dict(metadata or {})
    wrong = sorted(
        repr(k) for k, v in given.items() if not (isinstance(k, str) and isinstance(v, str))
    )
    if wrong:
        raise TypeError(f"metadata must map str -> str, but {', '.join(wrong)} do not; use str()")
    reserved = sorted(k for k in given if k == "format" or k.startswith("torchreparam."))
    if reserved:
        raise ValueError(f"metadata keys {reserved} are reserved (format, torchreparam.*); rename")
    return {**given, "format": "pt", _KIND_KEY: kind, _LAYOUT_KEY: layout_to_json(layout)}


# ---- files ------------------------------------------------------------------------------
def _require_safetensors() -> None:
    if _SAFETENSORS_ERROR is not None:
        raise ImportError(
            "torchreparam's checkpoint files need safetensors: pip install safetensors "
            "(or pip install 'torchreparam[checkpoint]')"
        ) from _SAFETENSORS_ERROR


def _owned(tensor: Tensor) -> Tensor:
    """A contiguous CPU copy that shares memory with nothing else."""
    return tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)


def _write(path: PathLike, tensors: dict[str, Tensor], header: dict[str, str]) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path``."""
    _require_safetensors()
    temporary = f"{os.fspath(path)}.{os.getpid()}.tmp"
    try:
        save_file(tensors, temporary, metadata=header)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _read(path: PathLike, device: Device) -> tuple[dict[str, Tensor], dict[str, str]]:
    _require_safetensors()
    with safe_open(os.fspath(path), framework="pt", device=str(device)) as file:
        return {k: file.get_tensor(k) for k in file.keys()}, file.metadata() or {}  # noqa: SIM118


def _stored_layout(meta: Mapping[str, str], path: PathLike, kind: str) -> FlatLayout | None:
    """The layout stored in the file (``None`` for a plain state dict), after checking kinds."""
    stored_kind = meta.get(_KIND_KEY, kind)
    if stored_kind != kind:
        what = {"flat": "one flat vector", "trajectory": "a weight trajectory"}
        reader = "load_trajectory" if stored_kind == "trajectory" else "load_flat"
        raise ValueError(
            f"{os.fspath(path)} holds {what.get(stored_kind, repr(stored_kind))}, not "
            f"{what[kind]}; read it with {reader}"
        )
    text = meta.get(_LAYOUT_KEY)
    return None if text is None else layout_from_json(text)


def _user_metadata(meta: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in meta.items() if k != "format" and not k.startswith("torchreparam.")}
