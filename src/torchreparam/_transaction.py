"""A call that raises leaves the module's own buffers as they were (train mode included).

In train mode, BatchNorm updates its running statistics as the forward runs; if something later
in the same call raises, a plain module keeps the half-done update. A call through the wrapper
copies the buffers of the modules that are in train mode before it runs, and puts them back
(values, and the tensor objects a module may have reassigned) when the call raises. (Version
counters cannot tell which buffers a call changes: BatchNorm's kernel updates the running
statistics without bumping theirs.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._inject import Core

__all__ = ["Snapshot", "rollback", "snapshot"]


class Snapshot:
    """The module's own buffers before a call: the objects, and copies of those that may change."""

    __slots__ = ("copies", "core", "refs")

    def __init__(self, core: Core) -> None:
        self.core = core
        self.refs = core.own_buffers()
        with torch.no_grad():
            self.copies = {
                i: self.refs[i].clone()
                for i, (module, _) in enumerate(core.buffer_sites)
                if module.training
            }


def snapshot(core: Core) -> Snapshot | None:
    """A snapshot if a call may update the module's own buffers (a module with buffers is in
    train mode), else ``None`` (then nothing is copied)."""
    sites = core.buffer_sites
    if not sites or torch.compiler.is_compiling() or not any(m.training for m, _ in sites):
        return None  # (a compiled graph is traced, not undone: nothing to snapshot there)
    return Snapshot(core)


def rollback(snap: Snapshot) -> None:
    """Put back the buffers as they were when ``snap`` was taken."""
    with torch.no_grad():
        for i, (module, name) in enumerate(snap.core.buffer_sites):
            old: Tensor = snap.refs[i]
            if module._buffers[name] is not old:
                module._buffers[name] = old  # reassigned by the module: the old object back
            if i in snap.copies:
                old.copy_(snap.copies[i])
