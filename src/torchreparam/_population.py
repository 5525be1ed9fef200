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
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ._batched import Plan, plan
from ._batched_graph import GraphPlan, graph_plan
from ._call import call, transactional
from ._checks import check_buffers, check_flat_param, check_in_dims
from ._inject import Core
from ._population_job import Columns, Job, join, rebuild, rng_state, set_rng_state
from ._replicate import called_by_data_parallel, one_vector
from ._types import Buffers, InDims, Output

__all__ = ["Strategy", "call_population", "population_buffers"]

Strategy = Literal["auto", "vmap", "loop", "batched"]
_STRATEGIES = ("auto", "vmap", "loop", "batched")
_RANDOMNESS = ("different", "same")


def population_buffers(
    core: Core, buffers: Buffers, population: int
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
    buffers: Buffers = None,
    in_dims: InDims = None,
    strategy: Strategy = "auto",
    plans: dict[Any, str] | None = None,
) -> Output:
    """``fn`` called once per row of ``thetas`` ``(population, num_params)``, outputs stacked.

    Args:
        in_dims: ``None`` (every input shared), ``0`` (every positional input has a leading
            population dimension), a tuple of ``0``/``None`` (one per positional input), or a
            dict ``{position or keyword name: 0 or None}`` (inputs not named are shared).
        buffers: as for single calls; each tensor either ``(population, *shape)`` (one per
            member, updated in place per member) or ``shape`` (shared by all members).
        plans: where ``"auto"`` remembers its choice per call signature.

    The wrapper's attributes ``population_chunk_size`` (``None`` or a number of members run at
    a time) and ``population_randomness`` (``"different"`` or ``"same"``) are read here.
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
    job, may_vmap, chunk_size, why = prepare(
        core, fn, args, kwargs, thetas, buffers, in_dims, strategy
    )
    if strategy == "auto" and torch.compiler.is_compiling():
        strategy = "vmap"  # timing cannot be traced; in a graph the batched call is the one
    if strategy == "batched" and job.steps is None:
        raise ValueError(
            f"strategy 'batched' has no plan for this call: {why}; use 'auto', 'vmap' or 'loop'"
        )
    plans = plans if plans is not None else {}

    def go() -> Any:
        return rebuild(_chunked(job, strategy, may_vmap, plans, chunk_size))

    # members sharing the module's own buffers: a raise in member k undoes members 0..k-1 too
    return transactional(core, go, (), {}) if job.buffers is None else go()


def prepare(
    core: Core,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    thetas: Tensor,
    buffers: Buffers,
    in_dims: InDims,
    strategy: str,
) -> tuple[Job, bool, int | None, str]:
    """The checked call as a job (with its batched plan, if any), whether vmap may run, the
    chunk size and, without a batched plan, why; raises before anything runs."""
    population = thetas.shape[0]
    dims, kw_dims = input_dims(in_dims, args, kwargs, population)
    bound, buffer_dims = population_buffers(core, buffers, population)
    chunk_size, randomness = population_options(core.holder)
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
    may_vmap = _vmap_is_exact(core, bound, buffer_dims)
    if strategy in ("vmap", "batched") and not may_vmap:
        raise ValueError(
            f"strategy {strategy!r} would update buffers shared by all members once instead of "
            "once per "
            "member (modules with buffers are in train mode): pass per-member buffers of shape "
            "(population, *shape), use eval mode, or use strategy 'loop'"
        )
    job = Job(core, fn, args, kwargs, thetas, bound, dims, buffer_dims, kw_dims, randomness)
    why = "not looked for (strategy 'vmap' or 'loop')"
    if strategy in ("auto", "batched"):
        job.steps, why = batched_plan(core, fn, args, kwargs)
    return job, may_vmap, chunk_size, why


def population_options(holder: nn.Module) -> tuple[int | None, str]:
    """The wrapper's ``population_chunk_size`` and ``population_randomness``, checked."""
    state = holder.__dict__
    chunk = state.get("population_chunk_size")
    randomness = state.get("population_randomness", "different")
    if chunk is not None and (type(chunk) is not int or chunk < 1):
        raise ValueError(
            f"population_chunk_size must be None or a positive int (members run at a time), got "
            f"{chunk!r}"
        )
    if randomness not in _RANDOMNESS:
        raise ValueError(f"population_randomness must be one of {_RANDOMNESS}, got {randomness!r}")
    return chunk, randomness


def input_dims(
    in_dims: InDims, args: tuple[Any, ...], kwargs: Mapping[str, Any], population: int
) -> tuple[tuple[int | None, ...], frozenset[str]]:
    """Per positional input 0 or None, and the keyword inputs given one per member."""
    if not isinstance(in_dims, Mapping):
        return check_in_dims(in_dims, args, population), frozenset()
    bad = [k for k in in_dims if not ((type(k) is int and 0 <= k < len(args)) or k in kwargs)]
    if bad:
        raise ValueError(
            f"in_dims as a dict maps positions (0 to {len(args) - 1} here) and keyword names "
            f"({sorted(kwargs)} here) to 0 or None; {bad} name no input of this call"
        )
    dims = check_in_dims(tuple(in_dims.get(i) for i in range(len(args))), args, population)
    per_member = []
    for name in sorted(k for k in in_dims if type(k) is str):
        dim, value = in_dims[name], kwargs[name]
        if dim is None:
            continue
        if dim != 0:
            raise ValueError(f"in_dims[{name!r}] must be 0 or None, got {dim!r}")
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != population:
            found = (
                f"of shape {tuple(value.shape)}"
                if isinstance(value, Tensor)
                else f"a {type(value).__name__}"
            )
            raise ValueError(
                f"in_dims[{name!r}] is 0 but keyword input {name!r} is {found}: its leading "
                f"dimension must be the population size {population}"
            )
        per_member.append(name)
    return dims, frozenset(per_member)


def _chunked(
    job: Job, strategy: str, may_vmap: bool, plans: dict[Any, str], chunk_size: int | None
) -> Columns:
    """The job run ``chunk_size`` members at a time (all at once for ``None``), joined."""
    population = job.thetas.shape[0]
    if chunk_size is None or chunk_size >= population:
        return _dispatch(job, strategy, may_vmap, plans)()
    start = rng_state(job.thetas.device) if job.randomness == "same" else None
    parts, sizes = [], []
    for begin in range(0, population, chunk_size):
        stop = min(begin + chunk_size, population)
        if start is not None:  # every chunk's members draw what the first member draws
            set_rng_state(job.thetas.device, start)
        parts.append(_dispatch(job.part(begin, stop), strategy, may_vmap, plans)())
        sizes.append(stop - begin)
    return join(parts, sizes)


def _dispatch(
    job: Job, strategy: str, may_vmap: bool, plans: dict[Any, str]
) -> Callable[[], Columns]:
    if strategy == "loop" or not may_vmap:
        return job.loop
    if strategy == "vmap":
        return job.vmap
    if strategy == "batched":
        return job.batched
    return lambda: _auto(job, plans)


def batched_plan(
    core: Core, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Plan | GraphPlan | None, str]:
    """The batched plan for this call, if the tree has one (:mod:`._batched` for a
    ``Sequential`` MLP, else :mod:`._batched_graph`), or ``None`` and the reason."""
    if kwargs:
        return None, "it has keyword inputs"
    if not args or not all(isinstance(a, Tensor) for a in args):
        return None, "its positional inputs are not all tensors"
    if not isinstance(fn, nn.Module):  # (fn: the root of the tree the layout describes)
        return None, "it does not call a module"
    compiling = torch.compiler.is_compiling()
    # (while compiling, nothing is remembered: a memo written in a graph would be a guard)
    memo = {} if compiling else core.memo
    if not core.buffer_names and len(args) == 1:
        mlp = plan(fn, core.layout, memo)
        if mlp is not None:
            return mlp, ""
    if compiling:
        return None, "it is being compiled (torch.fx does not trace inside torch.compile)"
    made = graph_plan(fn, core, memo)
    return (made, "") if isinstance(made, GraphPlan) else (None, made)


def _vmap_is_exact(core: Core, bound: list[Tensor] | None, dims: tuple[int | None, ...]) -> bool:
    """vmap equals the loop unless a shared buffer may be updated in place (train mode)."""
    if not core.buffer_names or not any(module.training for module, _ in core.buffer_sites):
        return True
    return bound is not None and all(d == 0 for d in dims)


def _auto(job: Job, plans: dict[Any, str]) -> Columns:
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
    # (on copies of the inputs too: a module that changes an input in place would change it
    # once under vmap, not once per member; such a trial loses)
    tj, inputs = _trial_job(job)
    candidates: list[tuple[str, Callable[[Tensor], Any]]] = []
    if job.steps is not None:  # (never raises for an input that does not fit: the loop would)
        candidates.append(("batched", lambda thetas: tj.batched(thetas, fallback=False)))
    given: list[Tensor] = []  # the buffers the members read, and per buffer 0 or None
    dims: tuple[int | None, ...] = ()
    trial: list[Tensor] = []  # copies of them, for the trial
    if not isinstance(job.steps, Plan):  # (the MLP plan is what vmap computes, written out)
        if job.buffers is not None:
            given, dims = job.buffers, job.buffer_dims
        else:
            given = job.shared_buffers() or job.core.own_buffers()
            dims = (None,) * len(given)
        with torch.no_grad():
            trial = [b.clone() for b in given]
        candidates.append(("vmap", lambda thetas: tj.vmap(trial, thetas, dims)))
    seconds: dict[str, float] = {}
    for name, candidate in candidates:
        try:
            with _rng_kept(job.thetas.device):
                seconds[name] = _trial(job, candidate, needs_grad=key[4])  # (key[4]: grad)
            shared = zip(trial, given, dims, strict=True)
            if not all(d == 0 or torch.equal(copy, b) for copy, b, d in shared) or not all(
                torch.equal(copy, x) for copy, x in inputs
            ):  # it updated a shared buffer or an input: once, not per member
                seconds[name] = float("inf")
        except Exception:  # an op without a batching rule, for example: the loop always works
            seconds[name] = float("inf")
    start = time.perf_counter()
    out = job.loop()
    seconds["loop"] = time.perf_counter() - start
    plans[key] = min(seconds, key=lambda name: seconds[name])  # (a tie: the first tried)
    job.core.memo.setdefault("population_trials", {})[key] = seconds  # (for explain)
    return out


def _trial_job(job: Job) -> tuple[Job, list[tuple[Tensor, Tensor]]]:
    """``job`` on copies of its tensor inputs, and the (copy, original) pairs."""
    pairs: list[tuple[Tensor, Tensor]] = []

    def copy(value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        with torch.no_grad():
            made = value.detach().clone().requires_grad_(value.requires_grad)
        pairs.append((made, value))
        return made

    args = tuple(copy(a) for a in job.args)
    kwargs = {k: copy(v) for k, v in job.kwargs.items()}
    buffers = None
    if job.buffers is not None:  # (per-member BatchNorm statistics: updated by the trial)
        with torch.no_grad():
            buffers = [b.clone() for b in job.buffers]
    tj = Job(
        job.core, job.fn, args, kwargs, job.thetas, buffers, job.dims, job.buffer_dims,
        job.kw_dims, job.randomness,
    )  # fmt: skip
    tj.steps = job.steps
    return tj, pairs


def _rng_kept(device: torch.device) -> AbstractContextManager[Any]:
    """Within the block, random draws on the CPU and on ``device`` are undone at its end."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])  # (the CPU generator only)
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def _trial(job: Job, candidate: Callable[[Tensor], Any], needs_grad: bool) -> float:
    """Seconds for a forward of ``candidate`` (given a detached copy of the vectors): the
    faster of two runs timed after a warm-up run (vmap's first call pays one-time costs; one
    timed run on a loaded machine picked the slower strategy now and then); raises if it (or
    its backward) fails."""
    thetas = job.thetas.detach().requires_grad_(job.thetas.requires_grad)
    with warnings.catch_warnings():  # the real run (the loop) shows the model's own warnings
        warnings.simplefilter("ignore")
        out = candidate(thetas)[1]  # (the columns' leaves)
        leaves = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.requires_grad]
        if needs_grad and leaves and thetas.requires_grad:
            torch.autograd.grad([t.sum() for t in leaves], thetas, allow_unused=True)
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            candidate(thetas)
            best = min(best, time.perf_counter() - start)
        return best
