"""Evaluating a population of flat vectors across the ranks of a process group.

An extras layer over ``torch.distributed``: it uses the public API only, and nothing in the core
imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["evaluate_population"]

# Every dtype by a code that is the same on every rank (same torch), for the gathered header.
_DTYPES = tuple(sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str))
_OK, _RAISED, _BAD_OUTPUT = 0, 1, 2


def evaluate_population(
    fn: Callable[[Tensor], Tensor], thetas: Tensor, *, group: ProcessGroup | None = None
) -> Tensor:
    """Evaluate ``fn`` on a population of flat vectors, the rows split across the ranks.

    Every rank passes the same ``thetas`` ``(population, num_params)``; each calls ``fn`` once
    on its contiguous share of the rows (the first ``population % world_size`` ranks take one
    row more; a rank with no rows does not call ``fn``) and every rank gets back all the
    results, in the order of the rows. Without an initialized process group (or with a group of
    one) it is ``fn(thetas)``, checked.

    The collectives run on ``thetas``' device, which the group's backend must support (CPU for
    gloo, CUDA for NCCL). If ``fn`` raises on any rank, or the ranks disagree on shapes, every
    rank raises (none is left waiting in a collective). Gradients do not flow through the
    gather: evaluate under ``torch.no_grad()``, as evolution strategies do.

    Args:
        fn: maps a block of rows ``(rows, num_params)`` to a tensor ``(rows, *shape)``: one
            result per row, for example ``lambda t: loss(r(x, flat_param=t), y)`` with a
            per-member loss. ``shape`` and dtype must be the same on every rank.
        thetas: ``(population, num_params)``, equal on every rank (draw it from the same seed
            everywhere, or broadcast it).
        group: the process group to split over; ``None`` means the default group, if one is
            initialized.

    Returns:
        ``(population, *shape)``: ``fn``'s results for all the rows (gathered on ``thetas``'
        device when the rows are split across ranks).

    Raises:
        TypeError: ``fn`` is not callable, ``thetas`` is not a tensor, or ``fn`` returns
            something other than a tensor.
        ValueError: ``thetas`` is not ``(population >= 1, num_params)``, ``fn``'s result does
            not have one row per input row, or the ranks disagree on ``thetas``' shape or on
            the results' shape or dtype.
        RuntimeError: ``fn`` raised on another rank (this rank's own error is re-raised as is).

    Example:
        >>> import torch
        >>> from torchreparam import ReparamModule, evaluate_population
        >>> r = ReparamModule(torch.nn.Linear(3, 1))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def loss(thetas):  # one mean squared error per row
        ...     return ((r(x, flat_param=thetas) - y) ** 2).mean(dim=(1, 2))
        >>> thetas = torch.randn(5, r.param_numel)
        >>> with torch.no_grad():  # under torchrun, each rank computes its share of the rows
        ...     fitness = evaluate_population(loss, thetas)
        >>> fitness.shape
        torch.Size([5])
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(thetas, Tensor):
        raise TypeError(f"thetas must be a torch.Tensor, got {type(thetas).__name__}")
    if thetas.dim() != 2 or thetas.shape[0] == 0:
        raise ValueError(
            f"thetas must have shape (population, num_params) with population >= 1, got "
            f"{tuple(thetas.shape)}"
        )
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        result = fn(thetas)
        _check_output(result, thetas.shape[0])
        return result
    rank = dist.get_rank(group)
    counts = [len(c) for c in torch.arange(thetas.shape[0]).tensor_split(world)]
    start = sum(counts[:rank])
    out: Tensor | None = None
    error: Exception | None = None
    if counts[rank]:
        try:
            out = fn(thetas[start : start + counts[rank]])
            _check_output(out, counts[rank])
        except Exception as exc:
            error = exc
    # header: status, population, num_params, dtype code and dims beyond the rows (-1: none)
    header = [_OK if error is None else _RAISED if out is None else _BAD_OUTPUT, *thetas.shape]
    header += (
        [-1, -1] if out is None or error is not None else [_DTYPES.index(out.dtype), out.dim() - 1]
    )
    headers = _gather(torch.tensor(header, device=thetas.device), world, group).tolist()
    _raise_on_disagreement(headers, error, rank)
    tail_dims = max(h[4] for h in headers)
    tail: tuple[int, ...] = ()
    if tail_dims:  # the result's shape beyond the rows, from every rank that has rows
        mine = out.shape[1:] if out is not None else [-1] * tail_dims
        tails = _gather(torch.tensor(mine, device=thetas.device), world, group).tolist()
        shapes = {tuple(t) for t, h in zip(tails, headers, strict=True) if h[4] >= 0}
        if len(shapes) > 1:
            raise ValueError(
                f"fn returned results of different shapes on different ranks: {sorted(shapes)}"
            )
        tail = shapes.pop()
    dtype = _DTYPES[max(h[3] for h in headers)]
    # Any dtype travels as bytes: (rows, bytes per row), padded to the largest share.
    width = torch.empty((1, *tail), dtype=dtype).reshape(1, -1).view(torch.uint8).shape[1]
    local = torch.zeros(max(counts), width, dtype=torch.uint8, device=thetas.device)
    if out is not None:
        flat = out.detach().to(thetas.device).reshape(counts[rank], -1).contiguous()
        local[: counts[rank]] = flat.view(torch.uint8)
    blocks = _gather(local, world, group).unbind(0)
    rows = torch.cat([b[:n] for b, n in zip(blocks, counts, strict=True)])
    return rows.view(dtype).reshape(thetas.shape[0], *tail)


def _check_output(out: object, rows: int) -> None:
    if not isinstance(out, Tensor):
        raise TypeError(f"fn must return a tensor (one result per row), got {type(out).__name__}")
    if out.dim() == 0 or out.shape[0] != rows:
        raise ValueError(
            f"fn was given {rows} rows and returned shape {tuple(out.shape)}: it must return "
            f"one result per row, shape ({rows}, ...)"
        )


def _gather(tensor: Tensor, world: int, group: ProcessGroup | None) -> Tensor:
    """``tensor`` (same shape on every rank) from every rank, stacked in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def _raise_on_disagreement(headers: list[list[int]], error: Exception | None, rank: int) -> None:
    """Raise on every rank alike when any rank failed or the ranks disagree."""
    failed = [i for i, h in enumerate(headers) if h[0] != _OK]
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(
            f"evaluate_population: fn failed on rank(s) {failed} (see the error raised there); "
            f"rank {rank} stops too"
        )
    sizes = {(h[1], h[2]) for h in headers}
    if len(sizes) > 1:
        raise ValueError(
            f"thetas must have the same shape on every rank, got {sorted(sizes)} "
            f"(population, num_params) across ranks"
        )
    kinds = {(h[3], h[4]) for h in headers if h[4] >= 0}
    if len(kinds) > 1:
        found = sorted(f"{_DTYPES[d]} with {n} dims" for d, n in kinds)
        raise ValueError(f"fn returned different dtypes or ranks on different ranks: {found}")
