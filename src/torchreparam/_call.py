"""Calling a managed module tree with a flat vector: validate, make views, bind, call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._checks import check_buffers, check_flat_param
from ._inject import Core, call_bound, innermost
from ._transaction import rollback, snapshot
from ._views import PLAIN

__all__ = ["call", "resolve", "transactional", "write_back"]

_grad_enabled = torch.is_grad_enabled


def resolve(
    core: Core, flat_param: Tensor | None, buffers: Any, *, lazy_own: bool = False
) -> tuple[Sequence[Tensor] | None, list[Tensor] | None, bool]:
    """Validate ``flat_param`` (one vector) and ``buffers``; return what to bind and whether
    checkpoint recomputation must be guarded (a caller's vector while autograd records).

    ``None`` means "what is in effect now": the innermost binding's tensors in this thread,
    else the module's own; with ``lazy_own``, the module's own params are bound as ``None``
    (read from ``flat_param`` at each access: a ``with`` block may span optimizer steps).
    Raises before anything is touched.
    """
    outer = innermost(core) if flat_param is None or buffers is None else None
    if flat_param is None:
        if outer is not None:
            params, guard = outer.params, outer.guard
        else:
            params, guard = (None if lazy_own else core.own_params()), False
    else:
        ref = core.params["flat_param"]
        assert ref is not None  # registered by the wrapper
        ok = (
            type(flat_param) in PLAIN
            and flat_param.shape == core.flat_shape  # (not ref.shape: a traced op under jit)
            and flat_param.dtype == ref.dtype
            and flat_param.device == ref.device
        )
        if not ok:
            check_flat_param(flat_param, core.layout.numel, ref)
            if flat_param.dim() != 1:
                raise ValueError(
                    f"flat_param has shape {tuple(flat_param.shape)}, but this call takes one "
                    f"vector ({core.layout.numel},); for a population, call the wrapper itself "
                    "with flat_param of shape (population, num_params)"
                )
        params = core.views(flat_param)
        guard = _grad_enabled()
    if buffers is None:
        bufs = outer.buffers if outer is not None else None
    else:
        bufs = check_buffers(buffers, core.buffer_names, core.own_buffers())
    return params, bufs, guard


def call(
    core: Core,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    flat_param: Tensor | None = None,
    buffers: Any = None,
    atomic: bool = True,
) -> Any:
    """``fn(*args, **kwargs)`` with the tree of ``core`` seeing ``flat_param``/``buffers``.

    If the call raises, the module's own buffers are put back as they were (train mode);
    ``atomic=False`` when an enclosing call already guarantees that (a population's members).
    """
    if flat_param is None and buffers is None and core.writes and innermost(core) is None:
        # The module's own weights, written in place by some module mid-call: every read must
        # see flat_param as it is now, so nothing is bound up front (the getters read it).
        return transactional(core, fn, args, kwargs)
    params, bufs, guard = resolve(core, flat_param, buffers)
    if bufs is None:  # the module's own buffers: undone if the call raises
        if not core.buffer_names or not atomic:
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
    return out


def write_back(given: list[Tensor], bound: list[Tensor]) -> None:
    """A buffer the module reassigned (``self.avg = ...``) updates the tensor it was given."""
    for old, new in zip(given, bound, strict=True):
        if new is not old:
            with torch.no_grad():
                old.copy_(new)
