"""Calling a managed module tree with a flat vector: validate, make views, bind, call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_buffers, check_flat_param
from ._inject import Core, call_bound, innermost
from ._transaction import learn, rollback, snapshot

__all__ = ["call", "resolve", "transactional", "write_back"]

_PLAIN = (Tensor, nn.Parameter)
_grad_enabled = torch.is_grad_enabled


def resolve(
    core: Core, flat_param: Tensor | None, buffers: Any
) -> tuple[tuple[Tensor, ...], list[Tensor] | None]:
    """Validate ``flat_param`` (1-D) and ``buffers``, and return the tensors to bind.

    ``None`` means "what is in effect now": the innermost binding's tensors in this thread,
    else the module's own. Raises before anything is touched.
    """
    outer = innermost(core) if flat_param is None or buffers is None else None
    if flat_param is None:
        params = outer[1] if outer is not None else core.own_views()
    else:
        ref = core.holder._parameters["flat_param"]
        assert ref is not None  # registered by the wrapper
        ok = (
            type(flat_param) in _PLAIN
            and flat_param.shape == ref.shape
            and flat_param.dtype == ref.dtype
            and flat_param.device == ref.device
        )
        if not ok:
            check_flat_param(flat_param, core.layout.numel, ref)
        params = core.views(flat_param)
    if buffers is None:
        bufs = outer[2] if outer is not None else None
    else:
        bufs = check_buffers(buffers, core.buffer_names, core.own_buffers())
    return params, bufs


def call(
    core: Core,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    flat_param: Tensor | None = None,
    buffers: Any = None,
) -> Any:
    """``fn(*args, **kwargs)`` with the tree of ``core`` seeing ``flat_param``/``buffers``.

    If the call raises, the module's own buffers are put back as they were (train mode).
    """
    if flat_param is None and buffers is None and core.writes and innermost(core) is None:
        # The module's own weights, written in place by some module mid-call: every read must
        # see flat_param as it is now, so nothing is bound up front (the getters read it).
        return transactional(core, fn, args, kwargs)
    params, bufs = resolve(core, flat_param, buffers)
    # A caller's vector while autograd records: checkpoint recomputation must see it too (also
    # when only the inputs need gradients).
    guard = flat_param is not None and _grad_enabled()
    if bufs is None:  # the module's own buffers: undone if the call raises
        if not core.buffer_sites:
            return call_bound(core, params, None, fn, args, kwargs, guard)
        return transactional(core, call_bound, (core, params, None, fn, args, kwargs, guard), {})
    given = list(bufs)
    out = call_bound(core, params, bufs, fn, args, kwargs, guard)
    if buffers is not None:
        write_back(given, bufs)
    return out


def transactional(
    core: Core, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``fn(*args, **kwargs)``; if it raises, the module's own buffers are put back."""
    snap = snapshot(core)
    if snap is None:
        return fn(*args, **kwargs)
    try:
        out = fn(*args, **kwargs)
    except BaseException:
        rollback(snap)
        raise
    learn(snap)
    return out


def write_back(given: list[Tensor], bound: list[Tensor]) -> None:
    """A buffer the module reassigned (``self.avg = ...``) updates the tensor it was given."""
    for old, new in zip(given, bound, strict=True):
        if new is not old:
            with torch.no_grad():
                old.copy_(new)
