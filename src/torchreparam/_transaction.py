"""A call that raises leaves the module's own buffers as they were (train mode included).

In train mode, BatchNorm updates its running statistics as the forward runs; if something later
in the same call raises, a plain module keeps the half-done update. A call through the wrapper
snapshots the buffers it may change and restores them (values, and the tensor objects a module
may have reassigned) when the call raises. Which buffers a call changes is learned from their
version counters: the first call copies every buffer, later calls only those seen changing
(BatchNorm's statistics, not, say, a causal mask).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._inject import Core

__all__ = ["Snapshot", "learn", "rollback", "snapshot"]


class Snapshot:
    """The module's own buffers before a call: the objects, their versions, some copies."""

    __slots__ = ("copies", "core", "refs", "versions")

    def __init__(self, core: Core) -> None:
        self.core = core
        self.refs = core.own_buffers()
        self.versions = [b._version for b in self.refs]
        known = core.mutable_buffers
        indices = range(len(self.refs)) if known is None else known
        with torch.no_grad():
            self.copies = {i: self.refs[i].clone() for i in indices}


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


def learn(snap: Snapshot) -> None:
    """After a call that returned: remember which buffers calls change."""
    now = snap.core.own_buffers()
    changed = {
        i
        for i, (before, version) in enumerate(zip(snap.refs, snap.versions, strict=True))
        if now[i] is not before or before._version != version
    }
    known = snap.core.mutable_buffers
    snap.core.mutable_buffers = changed if known is None else known | changed
