"""Calling a module tree with a population of flat vectors ``(population, num_params)``.

The reference semantics is the loop of single calls, stacked on a new leading dimension: each
tensor of the output stacked, each other value a list of the members' values (``None`` stays
``None``). Three strategies give it: a Python loop; ``torch.func.vmap`` (one batched call: far
faster for small dense models, slower for grouped convolutions and BatchNorm on CPU); and, for
a ``Sequential`` of ``Linear`` layers and activations, batched matrix products written out
(:mod:`._batched`: what ``vmap`` computes there, without its per-op dispatch). ``"auto"``
times the batched call (the written-out one where the module has a plan, else ``vmap``) against
the loop on the first call of each signature (shapes, population size, modes) and keeps the
faster.

``vmap`` is used only where it cannot differ from the loop: when no buffer shared by all
members can be updated in place (every module with buffers in eval mode, or every buffer given
per member). Otherwise the loop is the only strategy. ``vmap`` returns tensors only (and
``None``): an output with other values is refused there, and ``"auto"`` runs the loop.

``"auto"``'s trial leaves no trace: it runs on copies of the vectors and of every buffer, with
the random number generators put back afterwards, so the module ends as after the loop alone.
A trial that changes a copy of a buffer shared by all members (a module that updates a buffer
in eval mode) shows that the batched call would update it once, not once per member: the loop
is kept for that signature.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_unflatten

from ._batched import Plan, plan, run
from ._call import call, transactional, write_back
from ._checks import check_buffers, check_flat_param, check_in_dims
from ._inject import Core, call_bound
from ._replicate import called_by_data_parallel, one_vector

__all__ = ["Strategy", "call_population", "population_buffers"]

Strategy = Literal["auto", "vmap", "loop", "batched"]
_STRATEGIES = ("auto", "vmap", "loop", "batched")


def population_buffers(
    core: Core, buffers: Any, population: int
) -> tuple[list[Tensor] | None, tuple[int | None, ...]]:
    """Validated buffers for a population call and, per buffer, 0 (per member) or None (shared)."""
    if buffers is None:
        return None, ()
    own = core.own_buffers()
    bound = check_buffers(buffers, core.buffer_names, own, population=population)
    dims = tuple(
        0 if b.dim() == mine.dim() + 1 else None for b, mine in zip(bound, own, strict=True)
    )
    return bound, dims


def call_population(
    core: Core,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    thetas: Tensor,
    buffers: Any = None,
    in_dims: Any = None,
    strategy: Strategy = "auto",
    plans: dict[Any, str] | None = None,
) -> Any:
    """``fn`` called once per row of ``thetas`` ``(population, num_params)``, outputs stacked.

    Args:
        in_dims: ``None`` (every input shared), ``0`` (every positional input has a leading
            population dimension) or a tuple of ``0``/``None``, one per positional input.
        buffers: as for single calls; each tensor either ``(population, *shape)`` (one per
            member, updated in place per member) or ``shape`` (shared by all members).
        plans: where ``"auto"`` remembers its choice per call signature.
    """
    check_flat_param(thetas, core.layout.numel, core.flat())  # (the wrapper sends only 2-D)
    population = thetas.shape[0]
    if (
        population == 1
        and in_dims is None
        and not torch.compiler.is_compiling()
        and called_by_data_parallel(core.holder)
    ):  # nn.DataParallel on one device: the (1, N) row it split off stands for one vector
        theta, single = one_vector(core, thetas, buffers)
        return call(core, fn, args, kwargs, theta, single)
    dims = check_in_dims(in_dims, args, population)
    bound, buffer_dims = population_buffers(core, buffers, population)
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
    may_vmap = _vmap_is_exact(core, bound, buffer_dims)
    if strategy == "vmap" and not may_vmap:
        raise ValueError(
            "strategy 'vmap' would update buffers shared by all members once instead of once per "
            "member (modules with buffers are in train mode): pass per-member buffers of shape "
            "(population, *shape), use eval mode, or use strategy 'loop'"
        )
    if strategy == "auto" and torch.compiler.is_compiling():
        strategy = "vmap"  # timing cannot be traced; in a graph the batched call is the one
    job = _Job(core, fn, args, kwargs, thetas, bound, dims, buffer_dims)
    if strategy in ("auto", "batched"):
        job.steps = _batched_plan(core, fn, args, kwargs)
        if strategy == "batched" and job.steps is None:
            raise ValueError(
                "strategy 'batched' takes a module tree of nn.Sequential, nn.Linear, elementwise "
                "activations (not inplace), nn.Flatten and inactive nn.Dropout, as torch defines "
                "them (no hooks, no patched forward or __call__), without buffers, called with "
                "one tensor and no keyword inputs; this call is not one: use 'auto', 'vmap' or "
                "'loop'"
            )
    go = _dispatch(job, strategy, may_vmap, plans if plans is not None else {})
    # members sharing the module's own buffers: a raise in member k undoes members 0..k-1 too
    return transactional(core, go, (), {}) if bound is None else go()


def _dispatch(job: _Job, strategy: str, may_vmap: bool, plans: dict[Any, str]) -> Callable[[], Any]:
    if strategy == "loop" or not may_vmap:
        return job.loop
    if strategy == "vmap":
        return job.vmap
    if strategy == "batched":
        return job.batched
    return lambda: _auto(job, plans)


def _batched_plan(
    core: Core, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Plan | None:
    """The written-out batched plan for this call (:mod:`._batched`), if the tree has one."""
    if core.buffer_names or kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
        return None
    if not isinstance(fn, nn.Module):  # (fn: the root of the tree the layout describes)
        return None
    # (while compiling, nothing is remembered: a memo written in a graph would be a guard)
    return plan(fn, core.layout, {} if torch.compiler.is_compiling() else core.memo)


def _vmap_is_exact(core: Core, bound: list[Tensor] | None, dims: tuple[int | None, ...]) -> bool:
    """vmap equals the loop unless a shared buffer may be updated in place (train mode)."""
    if not core.buffer_names or not any(module.training for module, _ in core.buffer_sites):
        return True
    return bound is not None and all(d == 0 for d in dims)


class _Job:
    """One population call, runnable by either strategy."""

    def __init__(
        self,
        core: Core,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        thetas: Tensor,
        buffers: list[Tensor] | None,
        dims: tuple[int | None, ...],
        buffer_dims: tuple[int | None, ...],
    ) -> None:
        self.core, self.fn, self.args, self.kwargs = core, fn, args, kwargs
        self.thetas, self.buffers, self.dims, self.buffer_dims = thetas, buffers, dims, buffer_dims
        self.steps: Plan | None = None  # set where the module has a batched plan

    def batched(self, thetas: Tensor | None = None) -> Any:
        """The written-out batched call (:mod:`._batched`); the loop where the input does not
        fit it (the loop raises the module's own error, if any)."""
        assert self.steps is not None
        thetas = self.thetas if thetas is None else thetas
        out = run(self.steps, self.core.views.rows(thetas), self.args[0], self.dims[0] == 0)
        return self.loop() if out is None else out

    def key(self) -> tuple[Any, ...]:
        """What the faster strategy depends on: sizes, dtypes, grad, train/eval modes."""
        if self.steps is not None:  # one tensor input; the modes that matter are in the plan
            (x,) = self.args
            grad = torch.is_grad_enabled() and (self.thetas.requires_grad or x.requires_grad)
            return (self.thetas.shape, self.dims, x.shape, x.dtype, grad)
        shapes = tuple((a.shape, a.dtype) if isinstance(a, Tensor) else type(a) for a in self.args)
        grad = torch.is_grad_enabled() and (
            self.thetas.requires_grad
            or any(isinstance(a, Tensor) and a.requires_grad for a in self.args)
        )
        modes = (
            tuple(m.training for m in self.fn.modules()) if isinstance(self.fn, nn.Module) else ()
        )
        return (self.thetas.shape, self.dims, self.buffer_dims, shapes, grad, modes)

    def loop(self, buffers: Sequence[Tensor] | None = None) -> Any:
        buffers = self.buffers if buffers is None else buffers
        rows = [a.unbind(0) if d == 0 else None for a, d in zip(self.args, self.dims, strict=True)]
        outs = []
        for i, theta in enumerate(self.thetas.unbind(0)):  # one backward node for all rows
            args = tuple(a if r is None else r[i] for a, r in zip(self.args, rows, strict=True))
            bufs = None
            if buffers is not None:  # b[i]: a single-output view, so in-place updates land in b
                bufs = [
                    b if d is None else b[i] for b, d in zip(buffers, self.buffer_dims, strict=True)
                ]
            # (atomic=False: call_population undoes the whole population if a member raises)
            outs.append(call(self.core, self.fn, args, self.kwargs, theta, bufs, atomic=False))
        return stack_outputs(outs)

    def shared_buffers(self) -> list[Tensor] | None:
        """The buffers every member reads when none are given: those of an enclosing
        ``replaced_buffers`` block (``None``: the module's own)."""
        return self.core.bound_buffers()

    def vmap(
        self,
        buffers: Sequence[Tensor] | None = None,
        thetas: Tensor | None = None,
        buffer_dims: tuple[int | None, ...] | None = None,
    ) -> Any:
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
        found: list[Any] = []  # the output's structure, and which of its leaves are tensors

        def member(_row: Tensor, *rest: Any) -> Any:  # _row: one tensor to map over, always
            bufs = None if buffers is None else list(rest[size : size + count])
            given = None if bufs is None else list(bufs)
            out = call_bound(
                self.core, rest[:size], bufs, self.fn, rest[size + count :], self.kwargs
            )
            if given is not None and bufs is not None:
                write_back(given, bufs)
            leaves, spec = tree_flatten(out)
            if all(isinstance(leaf, Tensor) for leaf in leaves):
                found.append((spec, None))
                return tuple(leaves)
            kinds = _tensor_leaves(leaves, out)  # (raises for other values than None)
            found.append((spec, kinds))
            return tuple(leaf for leaf, tensor in zip(leaves, kinds, strict=True) if tensor)

        in_dims = (0, *(0,) * size, *(buffer_dims or ()), *self.dims)
        vmapped = torch.func.vmap(member, in_dims=in_dims, randomness="different")
        outs = vmapped(thetas, *views, *(buffers or ()), *self.args)
        spec, kinds = found[-1]
        if kinds is None:
            return tree_unflatten(list(outs), spec)
        stacked = iter(outs)
        return tree_unflatten([next(stacked) if k else None for k in kinds], spec)


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


def _auto(job: _Job, plans: dict[Any, str]) -> Any:
    key = job.key()
    plan = plans.get(key)
    if plan == "loop":
        return job.loop()
    if plan == "vmap":
        return job.vmap()
    if plan == "batched" and job.steps is not None:
        return job.batched()
    # First call of this signature: a trial of the batched call (and, when gradients are
    # needed, a backward through it: some batched kernels have no derivative), then the loop for
    # real; the faster one serves the next calls. The trial leaves no trace: it runs on copies
    # of the vectors and of every buffer, the random number generators are put back afterwards
    # (dropout draws as in the loop alone), and a trial that changed a buffer all members share
    # keeps the loop (the batched call would update it once, not once per member).
    candidate: Callable[[Tensor], Any]
    given: list[Tensor] = []  # the buffers the members read, and per buffer 0 or None
    dims: tuple[int | None, ...] = ()
    trial: list[Tensor] = []  # copies of them, for the trial
    if job.steps is not None:  # (a batched plan: the tree has no buffers)
        name, candidate = "batched", job.batched
    else:
        if job.buffers is not None:
            given, dims = job.buffers, job.buffer_dims
        else:
            given = job.shared_buffers() or job.core.own_buffers()
            dims = (None,) * len(given)
        with torch.no_grad():
            trial = [b.clone() for b in given]
        name = "vmap"

        def candidate(thetas: Tensor) -> Any:
            return job.vmap(trial, thetas, dims)

    try:
        with _rng_kept(job.thetas.device):
            batched_seconds = _trial(job, candidate, needs_grad=key[4])  # (key[4]: grad)
        shared = zip(trial, given, dims, strict=True)
        if not all(d == 0 or torch.equal(copy, b) for copy, b, d in shared):
            batched_seconds = float("inf")  # it updated a shared buffer: once, not per member
    except Exception:  # an op without a batching rule, for example: the loop always works
        batched_seconds = float("inf")
    start = time.perf_counter()
    out = job.loop()
    plans[key] = name if batched_seconds < time.perf_counter() - start else "loop"
    return out


def _rng_kept(device: torch.device) -> AbstractContextManager[Any]:
    """Within the block, random draws on the CPU and on ``device`` are undone at its end."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])  # (the CPU generator only)
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def _trial(job: _Job, candidate: Callable[[Tensor], Any], needs_grad: bool) -> float:
    """Seconds for a forward of ``candidate`` (given a detached copy of the vectors), timed
    after a warm-up run (vmap's first call pays one-time costs); raises if it (or its
    backward) fails."""
    thetas = job.thetas.detach().requires_grad_(job.thetas.requires_grad)
    with warnings.catch_warnings():  # the real run (the loop) shows the model's own warnings
        warnings.simplefilter("ignore")
        out = candidate(thetas)
        leaves = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.requires_grad]
        if needs_grad and leaves and thetas.requires_grad:
            torch.autograd.grad([t.sum() for t in leaves], thetas, allow_unused=True)
        start = time.perf_counter()
        candidate(thetas)
        return time.perf_counter() - start


def stack_outputs(outs: Sequence[Any]) -> Any:
    """The members' outputs as one: each tensor stacked on a new leading dimension, each other
    value a list of the members' values (``None`` where every member returned ``None``)."""
    if isinstance(outs[0], Tensor) and all(isinstance(out, Tensor) for out in outs):
        return _stack(tuple(outs), 0, outs)  # (one tensor each: the usual case, no pytree)
    leaves, spec = tree_flatten(outs[0])
    columns = [leaves]
    for i, out in enumerate(outs[1:], 1):
        more, their = tree_flatten(out)
        if their != spec:
            raise ValueError(
                f"the members' outputs differ in structure: member 0 returned {spec}, member "
                f"{i} returned {their}; a population call stacks the members' outputs, so they "
                "must have one structure (call the members one by one otherwise)"
            )
        columns.append(more)
    stacked = [_stack(column, i, outs) for i, column in enumerate(zip(*columns, strict=True))]
    return tree_unflatten(stacked, spec)


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
