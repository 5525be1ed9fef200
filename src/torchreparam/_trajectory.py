"""Weight trajectories: many flat vectors of one layout as one ``(steps, num_params)`` tensor.

A file of :func:`save_trajectory` is a plain safetensors file with the tensor ``"trajectory"``,
optionally ``"steps"`` (the step index of each row), and the layout in its metadata, as for
:func:`~torchreparam.save_flat`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ._checkpoint import _misfit, _resolve
from ._files import Device, PathLike, _check_layout, _header, _read, _write
from ._layout import FlatLayout

__all__ = ["Trajectory", "load_trajectory", "save_trajectory"]

_TRAJECTORY, _STEPS = "trajectory", "steps"


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
        >>> from torchreparam._trajectory import load_trajectory, save_trajectory
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
    tensors, stored, metadata = _read(path, device, "trajectory")
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
    return Trajectory(traj, expected, tensors.get(_STEPS), metadata)


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
