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
    return None if text is None else layout_from_json(text)


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
    return tensors, _stored_layout(meta, path, kind), _user_metadata(meta)
