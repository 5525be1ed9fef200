"""What a population call would run, and why: the strategy, the batched plan, auto's trial."""

from __future__ import annotations

from torch import Tensor

from ._batched import Plan
from ._batched_graph import GraphPlan
from ._checks import check_flat_param
from ._module import ReparamModule
from ._population import prepare
from ._types import Buffers, InDims

__all__ = ["explain_population"]


def explain_population(
    r: ReparamModule,
    *inputs: object,
    flat_param: Tensor,
    buffers: Buffers = None,
    in_dims: InDims = None,
    **kwargs: object,
) -> str:
    """How ``r(*inputs, flat_param=flat_param, ...)`` runs for a population, in words.

    Nothing runs: the call is checked as the real one would be (raising the same errors), and
    the answer says which strategy serves it (``r.population_strategy``, or ``"auto"``'s choice
    for this call signature with the seconds its trial measured, or that the first call will
    time them), whether ``vmap`` may run (not where members would share a buffer that train
    mode updates), whether the module has a batched plan (which layers run by a rule, which
    graph nodes run under ``vmap``) or why not, and the chunk size and randomness in effect.

    Args:
        r: the wrapper.
        *inputs: as for the call.
        flat_param: ``(population, num_params)``.
        buffers: as for the call.
        in_dims: as for the call.
        **kwargs: as for the call.

    Returns:
        several lines of text.

    Example:
        >>> import torch
        >>> from torchreparam import ReparamModule, explain_population
        >>> r = ReparamModule(torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.ReLU()))
        >>> thetas, x = torch.randn(4, r.param_numel), torch.randn(5, 1, 8)
        >>> print(explain_population(r, x, flat_param=thetas).splitlines()[0])
        population of 4, population_strategy 'auto'
    """
    if not isinstance(r, ReparamModule):
        raise TypeError(f"r must be a ReparamModule, got {type(r).__name__}")
    core = r._core
    check_flat_param(flat_param, core.layout.numel, core.flat())
    if flat_param.dim() != 2:
        raise ValueError(
            f"flat_param must be a population (population, {core.layout.numel}), got shape "
            f"{tuple(flat_param.shape)}"
        )
    strategy = r.population_strategy
    job, may_vmap, chunk, why = prepare(
        core, r.module, inputs, kwargs, flat_param, buffers, in_dims, "auto"
    )
    lines = [f"population of {flat_param.shape[0]}, population_strategy {strategy!r}"]
    lines.append(
        "vmap: may run (no buffer shared by all members is updated)"
        if may_vmap
        else "vmap: may not run (modules with buffers in train mode and no per-member buffers: "
        "each member must update them in turn), so the loop runs"
    )
    lines.append(_describe_plan(job.steps, why))
    if strategy == "auto" and may_vmap:
        if chunk is not None and chunk < flat_param.shape[0]:
            job = job.part(0, chunk)  # (auto decides per chunk: the first chunk's signature)
        key = job.key()
        chosen = r._plans.get(key)
        if chosen is None:
            lines.append("auto: this signature is new: its first call times the candidates")
        else:
            trial = core.memo.get("population_trials", {}).get(key, {})
            timed = ", ".join(f"{name} {1e3 * s:.3g} ms" for name, s in trial.items())
            lines.append(f"auto: chose {chosen!r} for this signature (trial: {timed})")
    lines.append(f"population_chunk_size {chunk!r}, population_randomness {job.randomness!r}")
    return "\n".join(lines)


def _describe_plan(steps: Plan | GraphPlan | None, why: str) -> str:
    if steps is None:
        return f"batched plan: none ({why})"
    if isinstance(steps, Plan):
        return "batched plan: the multilayer perceptron's (one baddbmm per Linear)"
    layers = sorted({type(m).__name__ for m in steps.leaves.values()})
    vmapped = sorted(set(steps.vmapped))
    text = f"batched plan: a traced graph; layers by rule: {', '.join(layers) or 'none'}"
    return text + (f"; under vmap node by node: {', '.join(vmapped)}" if vmapped else "")
