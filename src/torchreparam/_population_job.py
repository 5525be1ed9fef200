"""One population call (or one chunk of it) and the strategies that run it.

Every strategy returns the output as *columns*: the structure of one member's output and, per
leaf, the members' values stacked (a tensor ``(members, ...)``), ``None`` (every member returned
``None``) or the list of the members' values. Chunks of a population are joined column by
column (:func:`join`) before the structure is rebuilt once (:func:`rebuild`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import (
    TreeSpec,
    keystr,
    tree_flatten,
    tree_flatten_with_path,
    tree_unflatten,
)

from ._batched import Plan, run
from ._batched_graph import GraphPlan
from ._batched_rules import Stacked
from ._batched_run import run_graph
from ._call import call, write_back
from ._inject import Core, call_bound

__all__ = ["Columns", "Job", "join", "rebuild", "rng_state", "set_rng_state", "stack_outputs"]

Columns = tuple[TreeSpec, list[Any]]  # one member's output structure; per leaf, all members'
_ONE_TENSOR = tree_flatten(0)[1]  # the structure of an output that is one tensor


class Job:
    """One population call (or a chunk of one), runnable by every strategy.

    Args:
        dims: per positional input, 0 (one per member: a leading population dimension) or None.
        kw_dims: the keyword inputs that have a leading population dimension (value 0).
        randomness: ``"different"`` (each member draws its own random numbers, as the loop
            does) or ``"same"`` (every member draws the numbers the first one draws).
    """

    def __init__(
        self,
        core: Core,
        fn: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        thetas: Tensor,
        buffers: list[Tensor] | None,
        dims: tuple[int | None, ...],
        buffer_dims: tuple[int | None, ...],
        kw_dims: frozenset[str] = frozenset(),
        randomness: str = "different",
    ) -> None:
        self.core, self.fn, self.args, self.kwargs = core, fn, args, kwargs
        self.thetas, self.buffers, self.dims, self.buffer_dims = thetas, buffers, dims, buffer_dims
        self.kw_dims, self.randomness = kw_dims, randomness
        self.steps: Plan | GraphPlan | None = None  # set where the module has a batched plan

    def part(self, start: int, stop: int) -> Job:
        """The members ``start:stop`` as a job of their own (views: buffers update in place)."""

        def cut(values: Sequence[Any], dims: Sequence[int | None]) -> tuple[Any, ...]:
            return tuple(
                v if d is None else v[start:stop] for v, d in zip(values, dims, strict=True)
            )

        kwargs = {k: v[start:stop] if k in self.kw_dims else v for k, v in self.kwargs.items()}
        buffers = None if self.buffers is None else list(cut(self.buffers, self.buffer_dims))
        job = Job(
            self.core, self.fn, cut(self.args, self.dims), kwargs, self.thetas[start:stop],
            buffers, self.dims, self.buffer_dims, self.kw_dims, self.randomness,
        )  # fmt: skip
        job.steps = self.steps
        return job

    def batched(self, thetas: Tensor | None = None, fallback: bool = True) -> Columns:
        """The batched call (:mod:`._batched`, :mod:`._batched_graph`); the loop where the
        input does not fit it (the loop raises the module's own error, if any), or with
        ``fallback=False`` a ``ValueError``."""
        assert self.steps is not None
        thetas = self.thetas if thetas is None else thetas
        rows = self.core.views.rows(thetas)
        if isinstance(self.steps, Plan):
            out = run(self.steps, rows, self.args[0], self.dims[0] == 0)
            if out is None and not fallback:
                raise ValueError("the input does not fit the batched plan")
            return self.loop() if out is None else (_ONE_TENSOR, [out])
        buffers = self.graph_buffers()  # (only per-member ones may change: BatchNorm, train)
        with torch.no_grad():
            saved = [b.value.clone() for b in buffers.values() if b.stacked]
        try:
            made = run_graph(self.steps, rows, self.args, self.dims, buffers, self.randomness)
        except Exception:  # an input that does not fit: the loop raises the module's own error
            made = None
            if not fallback:
                raise
        finally:
            if made is None:  # (nothing happened: the loop, if any, starts from the same state)
                with torch.no_grad():
                    changed = [b.value for b in buffers.values() if b.stacked]
                    for now, before in zip(changed, saved, strict=True):
                        now.copy_(before)
        if made is None:
            if not fallback:
                raise ValueError("the input does not fit the batched plan")
            return self.loop()
        leaves, spec = tree_flatten(made)
        return spec, leaves

    def graph_buffers(self) -> dict[str, Stacked]:
        """The buffers the members read, by name: per member (stacked) or shared."""
        names = self.core.buffer_names
        if self.buffers is not None:
            pairs = zip(self.buffers, self.buffer_dims, strict=True)
            return {n: Stacked(b, d == 0) for n, (b, d) in zip(names, pairs, strict=True)}
        shared = self.shared_buffers() or self.core.own_buffers()
        return {n: Stacked(b, False) for n, b in zip(names, shared, strict=True)}

    def key(self) -> tuple[Any, ...]:
        """What the faster strategy depends on: sizes, dtypes, grad, train/eval modes."""
        if isinstance(self.steps, Plan):  # one tensor input; the modes that matter are in it
            (x,) = self.args
            grad = torch.is_grad_enabled() and (self.thetas.requires_grad or x.requires_grad)
            return (self.thetas.shape, self.dims, x.shape, x.dtype, grad)
        inputs = (*self.args, *self.kwargs.values())
        shapes = tuple((a.shape, a.dtype) if isinstance(a, Tensor) else type(a) for a in inputs)
        grad = torch.is_grad_enabled() and (
            self.thetas.requires_grad
            or any(isinstance(a, Tensor) and a.requires_grad for a in inputs)
        )
        modes = (
            tuple(m.training for m in self.fn.modules()) if isinstance(self.fn, nn.Module) else ()
        )
        kw = (tuple(self.kwargs), self.kw_dims, self.randomness)
        return (self.thetas.shape, self.dims, self.buffer_dims, shapes, grad, modes, kw)

    def member_inputs(self) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        """Each member's positional and keyword inputs."""
        rows = [a.unbind(0) if d == 0 else None for a, d in zip(self.args, self.dims, strict=True)]
        kw_rows = {k: self.kwargs[k].unbind(0) for k in self.kw_dims}
        out = []
        for i in range(self.thetas.shape[0]):
            args = tuple(a if r is None else r[i] for a, r in zip(self.args, rows, strict=True))
            kwargs = {k: kw_rows[k][i] if k in kw_rows else v for k, v in self.kwargs.items()}
            out.append((args, kwargs))
        return out

    def loop(self, buffers: Sequence[Tensor] | None = None) -> Columns:
        buffers = self.buffers if buffers is None else buffers
        start = rng_state(self.thetas.device) if self.randomness == "same" else None
        outs = []
        inputs = self.member_inputs()
        for i, theta in enumerate(self.thetas.unbind(0)):  # one backward node for all rows
            args, kwargs = inputs[i]
            bufs = None
            if buffers is not None:  # b[i]: a single-output view, so in-place updates land in b
                bufs = [
                    b if d is None else b[i] for b, d in zip(buffers, self.buffer_dims, strict=True)
                ]
            if start is not None:  # every member draws what the first one draws
                set_rng_state(self.thetas.device, start)
            # (atomic=False: call_population undoes the whole population if a member raises)
            outs.append(call(self.core, self.fn, args, kwargs, theta, bufs, atomic=False))
        return columns(outs)

    def shared_buffers(self) -> list[Tensor] | None:
        """The buffers every member reads when none are given: those of an enclosing
        ``replaced_buffers`` block (``None``: the module's own)."""
        return self.core.bound_buffers()

    def vmap(
        self,
        buffers: Sequence[Tensor] | None = None,
        thetas: Tensor | None = None,
        buffer_dims: tuple[int | None, ...] | None = None,
    ) -> Columns:
        if buffers is None:
            buffers, buffer_dims = self.buffers, self.buffer_dims
            if buffers is None:  # (single calls read an enclosing block's buffers too)
                buffers = self.shared_buffers()
                buffer_dims = None if buffers is None else (None,) * len(buffers)
        buffer_dims = self.buffer_dims if buffer_dims is None else buffer_dims
        thetas = self.thetas if thetas is None else thetas
        count = 0 if buffers is None else len(buffers)
        # Every member's views, sliced once out of the (population, N) matrix: no split or
        # view runs per member under vmap (each batched op costs vmap's dispatch).
        views = self.core.views.rows(thetas)
        size = len(views)
        n_args = len(self.args)
        per_member = tuple(self.kw_dims)  # keyword inputs mapped over: after the positional ones
        found: list[Any] = []  # the output's structure, and which of its leaves are tensors

        def member(_row: Tensor, *rest: Any) -> Any:  # _row: one tensor to map over, always
            bufs = None if buffers is None else list(rest[size : size + count])
            given = None if bufs is None else list(bufs)
            args = rest[size + count : size + count + n_args]
            mapped = rest[size + count + n_args :]
            kwargs = {**self.kwargs, **dict(zip(per_member, mapped, strict=True))}
            out = call_bound(self.core, rest[:size], bufs, self.fn, args, kwargs)
            if given is not None and bufs is not None:
                write_back(given, bufs)
            leaves, spec = tree_flatten(out)
            if all(isinstance(leaf, Tensor) for leaf in leaves):
                found.append((spec, None))
                return tuple(leaves)
            kinds = _tensor_leaves(leaves, out)  # (raises for other values than None)
            found.append((spec, kinds))
            return tuple(leaf for leaf, tensor in zip(leaves, kinds, strict=True) if tensor)

        in_dims = (
            0, *(0,) * size, *(buffer_dims or ()), *self.dims, *(0,) * len(per_member)
        )  # fmt: skip
        vmapped = torch.func.vmap(member, in_dims=in_dims, randomness=self.randomness)
        kw_values = (self.kwargs[k] for k in per_member)
        outs = vmapped(thetas, *views, *(buffers or ()), *self.args, *kw_values)
        spec, kinds = found[-1]
        if kinds is None:
            return spec, list(outs)
        stacked = iter(outs)
        return spec, [next(stacked) if k else None for k in kinds]


def _tensor_leaves(leaves: list[Any], out: Any) -> list[bool]:
    """Which leaves of a vmapped member's output are tensors (``None`` is kept as it is);
    raises for any other value, which vmap cannot give each member."""
    for i, leaf in enumerate(leaves):
        if leaf is not None and not isinstance(leaf, Tensor):
            where = keystr(tree_flatten_with_path(out)[0][i][0])
            raise ValueError(
                "population_strategy 'vmap' returns tensors only, but the module's output holds a "
                f"value of type {type(leaf).__name__} at output{where}: vmap runs the module once "
                "for all members, so it cannot give each member its own. Use population_strategy "
                "'auto' or 'loop' (which give the list of the members' values there), or return "
                "a tensor"
            )
    return [leaf is not None for leaf in leaves]


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The CPU generator's state and ``device``'s (``None`` for the CPU)."""
    if device.type == "cpu":
        return torch.get_rng_state(), None
    return torch.get_rng_state(), torch.get_device_module(device.type).get_rng_state(device)


def set_rng_state(device: torch.device, state: tuple[Tensor, Tensor | None]) -> None:
    cpu, other = state
    torch.set_rng_state(cpu)
    if other is not None:
        torch.get_device_module(device.type).set_rng_state(other, device)


def stack_outputs(outs: Sequence[Any]) -> Any:
    """The members' outputs as one: each tensor stacked on a new leading dimension, each other
    value a list of the members' values (``None`` where every member returned ``None``)."""
    return rebuild(columns(outs))


def rebuild(cols: Columns) -> Any:
    """The output the columns stand for."""
    spec, leaves = cols
    return leaves[0] if spec is _ONE_TENSOR else tree_unflatten(leaves, spec)


def columns(outs: Sequence[Any]) -> Columns:
    """The members' outputs, column by column (see the module's docstring)."""
    if isinstance(outs[0], Tensor) and all(isinstance(out, Tensor) for out in outs):
        return _ONE_TENSOR, [_stack(tuple(outs), 0, outs)]  # (the usual case, no pytree)
    leaves, spec = tree_flatten(outs[0])
    cols = [leaves]
    for i, out in enumerate(outs[1:], 1):
        more, their = tree_flatten(out)
        if their != spec:
            raise ValueError(
                f"the members' outputs differ in structure: member 0 returned {spec}, member "
                f"{i} returned {their}; a population call stacks the members' outputs, so they "
                "must have one structure (call the members one by one otherwise)"
            )
        cols.append(more)
    return spec, [_stack(column, i, outs) for i, column in enumerate(zip(*cols, strict=True))]


def join(parts: Sequence[Columns], sizes: Sequence[int]) -> Columns:
    """The columns of consecutive chunks of a population (``sizes`` members each) as one."""
    spec = parts[0][0]
    for i, (their, _) in enumerate(parts[1:], 1):
        if their != spec:
            raise ValueError(
                f"the members' outputs differ in structure: chunk 0 returned {spec}, chunk {i} "
                f"returned {their}; a population call stacks the members' outputs, so they "
                "must have one structure (call the members one by one otherwise)"
            )
    joined: list[Any] = []
    for column in zip(*(leaves for _, leaves in parts), strict=True):
        if all(isinstance(v, Tensor) for v in column):
            joined.append(torch.cat(column))
        elif all(v is None for v in column):
            joined.append(None)
        else:  # some chunks have per-member lists here: a list for the whole population
            joined.append([m for v, n in zip(column, sizes, strict=True) for m in _listed(v, n)])
    return spec, joined


def _listed(value: Any, members: int) -> list[Any]:
    if isinstance(value, Tensor):
        return list(value.unbind(0))
    return [None] * members if value is None else list(value)


def _stack(column: tuple[Any, ...], leaf: int, outs: Sequence[Any]) -> Any:
    """One leaf of every member's output: a stacked tensor, ``None`` or a list."""
    first = column[0]
    if isinstance(first, Tensor) and all(isinstance(v, Tensor) for v in column):
        try:
            return torch.stack(column)
        except RuntimeError:
            if len({v.shape for v in column}) == 1:
                raise  # (not a shape problem)
            where = keystr(tree_flatten_with_path(outs[0])[0][leaf][0])
            raise ValueError(
                f"the members' outputs differ in shape at output{where}: "
                f"{[tuple(v.shape) for v in column]}; a population call stacks each tensor of "
                "the output, so the members must return equal shapes (call them one by one "
                "otherwise)"
            ) from None
    if first is None and all(v is None for v in column):
        return None
    return list(column)
