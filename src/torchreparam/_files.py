"""The safetensors file layer: tensors and a layout in a file anyone can read.

A file of torchreparam is a plain safetensors file: its tensors under their names, and in the
header's metadata the user's ``str -> str`` pairs, the kind of file (``"torchreparam.kind"``:
``"flat"`` or ``"trajectory"``) and the layout (names, shapes, offsets, aliases, dtype) as JSON
(``"torchreparam.layout"``). safetensors is optional: ``pip install safetensors`` (or
``torchreparam[checkpoint]``); only reading and writing files need it.
"""

from __future__ import annotations

import json
import os
import reprlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._layout import FlatLayout, LayoutEntry

try:
    from safetensors import safe_open
    from safetensors.torch import save_file
except ImportError as err:  # pragma: no cover - the tests monkeypatch _SAFETENSORS_ERROR
    _SAFETENSORS_ERROR: ImportError | None = err
else:
    _SAFETENSORS_ERROR = None

__all__ = ["LAYOUT_VERSION", "layout_from_json", "layout_to_json"]

LAYOUT_VERSION = 1
_LAYOUT_KEY, _KIND_KEY = "torchreparam.layout", "torchreparam.kind"
PathLike = str | os.PathLike[str]
Device = str | torch.device


# ---- the layout as JSON -----------------------------------------------------------------
def layout_to_json(layout: FlatLayout) -> str:
    """The layout as JSON: ``version``, ``dtype`` (as ``"float32"``), ``numel``, ``entries``.

    Example:
        >>> import torch
        >>> from torchreparam import FlatLayout
        >>> from torchreparam._files import layout_from_json, layout_to_json
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
        ValueError: ``text`` is not a layout's JSON (nested too deeply to read included), or
            was written by a newer version.
    """
    try:
        data = json.loads(text)
        if type(data["version"]) is not int:
            raise ValueError(f"version {_short(data['version'])}: expected an integer")
        if data["version"] != LAYOUT_VERSION:
            raise ValueError(
                f"version {_short(data['version'])}, and this torchreparam reads version "
                f"{LAYOUT_VERSION}; upgrade torchreparam to read newer files"
            )
        dtype = getattr(torch, data["dtype"], None) if isinstance(data["dtype"], str) else None
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {_short(data['dtype'])}")
        if not isinstance(data["entries"], list):
            raise ValueError(f"entries must be a list, got {_short(data['entries'])}")
        layout = FlatLayout(tuple(_entry_from_json(e) for e in data["entries"]), dtype)
        if layout.numel != data["numel"]:
            raise ValueError(f"numel {_short(data['numel'])}, but the entries hold {layout.numel}")
    except RecursionError:
        # json.loads recurses once per level of nesting: '[' * 100000 exhausts the stack.
        raise ValueError(
            "not a torchreparam layout JSON: nested too deeply to read (a layout's JSON nests "
            "4 levels); the text is corrupt or not a layout"
        ) from None
    except (TypeError, KeyError, AttributeError, ValueError) as error:
        why = str(error)  # (it may quote a name from the text: cut short, as _short does)
        why = why if len(why) <= 500 else f"{why[:240]}...{why[-240:]}"
        raise ValueError(f"not a torchreparam layout JSON: {why}") from None
    return layout


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def _short(value: object) -> str:
    """``repr(value)``, cut short (a value read from a file may be huge or deeply nested)."""
    return _REPR.repr(value)


def _entry_from_json(data: Mapping[str, Any]) -> LayoutEntry:
    if not isinstance(data, dict):
        raise ValueError(f"each entry must be a JSON object, got {_short(data)}")
    name, shape, offset, aliases = data["name"], data["shape"], data["offset"], data["aliases"]
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in (offset, *shape)):
        raise ValueError(f"entry {_short(name)}: shape and offset must be non-negative integers")
    if not isinstance(aliases, list) or not all(isinstance(n, str) for n in (name, *aliases)):
        raise ValueError(f"entry {_short(name)}: name and aliases must be strings")
    return LayoutEntry(name, tuple(shape), offset, tuple(aliases))


def _check_layout(layout: object) -> None:
    if not isinstance(layout, FlatLayout):
        raise TypeError(
            "layout must be a FlatLayout (for example r.layout or FlatLayout.from_module(model))"
            f", got {type(layout).__name__}"
        )


# ---- the header's metadata --------------------------------------------------------------
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
    if text is None:
        return None
    try:
        return layout_from_json(text)
    except ValueError as error:
        raise ValueError(
            f"{os.fspath(path)}: the layout in its metadata ({_LAYOUT_KEY!r}) cannot be read: "
            f"{error}; the file is damaged, or was not written by torchreparam "
            "(safetensors.torch.load_file reads its tensors)"
        ) from None


def _check_aliases(tensors: Mapping[str, Tensor], layout: FlatLayout, path: PathLike) -> None:
    """Refuse a file whose layout calls a tensor of the file an alias: a tied parameter is
    stored once, under its entry's name, and its aliases are filled from it, which would
    overwrite that tensor's values silently."""
    clashes = [
        (alias, entry.name)
        for entry in layout
        if entry.name in tensors
        for alias in entry.aliases
        if alias in tensors
    ]
    if clashes:
        listed = "; ".join(
            f"{alias!r} is declared an alias of {name!r}, yet the file holds a tensor "
            f"{alias!r} besides {name!r}"
            for alias, name in clashes
        )
        raise ValueError(
            f"{os.fspath(path)} is inconsistent (nothing was loaded): {listed}. A tied "
            "parameter is stored once, under its first name, and loading fills its aliases "
            "from it, which would overwrite those tensors silently. Read its tensors with "
            "safetensors.torch.load_file, or save the model again"
        )


def _user_metadata(meta: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in meta.items() if k != "format" and not k.startswith("torchreparam.")}


# ---- reading and writing ----------------------------------------------------------------
def _require_safetensors() -> None:
    """Raise a clear ImportError without safetensors: every read and write goes through here."""
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


def _read(
    path: PathLike, device: Device, kind: str
) -> tuple[dict[str, Tensor], FlatLayout | None, dict[str, str]]:
    """The file's tensors, its stored layout (``None`` for a plain state dict) and the user
    metadata, after checking that it holds ``kind`` (``"flat"`` or ``"trajectory"``)."""
    _require_safetensors()
    with safe_open(os.fspath(path), framework="pt", device=str(device)) as file:
        tensors = {k: file.get_tensor(k) for k in file.keys()}  # noqa: SIM118
        meta: dict[str, str] = file.metadata() or {}
    stored = _stored_layout(meta, path, kind)
    if stored is not None and kind == "flat":  # (a trajectory's tensors are not by name)
        _check_aliases(tensors, stored, path)
    return tensors, stored, _user_metadata(meta)
