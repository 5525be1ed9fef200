"""Put tensors back as they were: before a call that may raise, before a load that may fail.

In train mode, BatchNorm updates its running statistics as the forward runs; if something later
in the same call raises, a plain module keeps the half-done update. A call through the wrapper
copies the buffers of the modules that are in train mode before it runs, and puts them back
(values, and the tensor objects a module may have reassigned) when the call raises. (Version
counters cannot tell which buffers a call changes: BatchNorm's kernel updates the running
statistics without bumping theirs.) ``load_state_dict`` does the same for the whole state
(``_state_dict``): both keep a :class:`Saved`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ._inject import Core

__all__ = ["Place", "Saved", "rollback", "snapshot"]

# Where a tensor lives: a module's ``_parameters`` or ``_buffers`` dict, its key there, and
# whether its values may change (then they are copied).
Place = tuple[dict[str, Tensor], str, bool]


class Saved:
    """Tensors in their places: the objects, and copies of the values of those that may change."""

    __slots__ = ("entries",)

    def __init__(self, places: Iterable[Place]) -> None:
        with torch.no_grad():
            self.entries = [
                (slots, key, slots[key], slots[key].clone() if changes else None)
                for slots, key, changes in places
            ]

    def restore(self) -> None:
        """Put back the same tensor objects (where another was put in), holding the same values."""
        with torch.no_grad():
            for slots, key, tensor, values in self.entries:
                if slots[key] is not tensor:
                    slots[key] = tensor
                if values is not None:
                    tensor.copy_(values)


def snapshot(core: Core) -> Saved | None:
    """The module's own buffers before a call, if a call may update them (a module with buffers
    is in train mode), else ``None`` (then nothing is copied)."""
    sites = core.buffer_sites
    if not sites or torch.compiler.is_compiling() or not any(m.training for m, _ in sites):
        return None  # (a compiled graph is traced, not undone: nothing to snapshot there)
    return Saved((module._buffers, name, module.training) for module, name in sites)  # type: ignore[misc]


def rollback(snap: Saved) -> None:
    """Put back the buffers as they were when ``snap`` was taken."""
    snap.restore()
