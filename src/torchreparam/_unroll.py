"""``unroll``: K differentiable inner optimizer steps over a flat vector, in bounded memory.

The inner loops of MAML, dataset distillation and hyperparameter learning, as one call:
``theta_K = unroll(inner_loss, theta_0, batches, optimizer="sgd", memory=..., lr=...)``.
The memory modes trade time for memory (``full``: today's plain unroll; ``checkpoint``: the
same gradient, recomputing steps, in one or two levels; ``truncated`` and ``implicit``:
approximations whose memory does not grow with K). See the "Long inner loops" page of the docs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple, TypeAlias, overload

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

from ._inner import AdamState, SGDState, adam, sgd
from ._types import Buffers
from ._unroll_checkpoint import checkpointed
from ._unroll_implicit import implicit
from ._unroll_inputs import Inputs
from ._unroll_step import Step

__all__ = ["InnerLoss", "InnerOptimizer", "OptimizerState", "Unrolled", "unroll"]

Memory = Literal["full", "checkpoint", "truncated", "implicit"]

OptimizerState: TypeAlias = (
    SGDState | AdamState | Tensor | tuple[object, ...] | Mapping[str, object] | None
)
"""The optimizer's state between steps: :class:`SGDState` or :class:`AdamState` for the built-in
optimizers, ``None`` before the first step, or a custom optimizer function's own (a tensor, or a
tuple or dict of tensors)."""

InnerLoss: TypeAlias = Callable[..., Tensor | tuple[Tensor, Buffers]]
"""``inner_loss(theta, batch) -> scalar``, or with threaded buffers
``inner_loss(theta, batch, buffers) -> (scalar, new_buffers)``."""

InnerOptimizer: TypeAlias = Callable[..., tuple[Tensor, OptimizerState]]
"""``update(theta, grad, state, **hyperparameters) -> (theta, state)``, as :func:`sgd`."""
_OPTIMIZERS: dict[str, InnerOptimizer] = {"sgd": sgd, "adam": adam}
_MODES = ("full", "checkpoint", "truncated", "implicit")


class Unrolled(NamedTuple):
    """What :func:`unroll` returns with ``return_state=True``.

    Attributes:
        theta: the vector after the last step, ``(num_params,)`` or ``(population, num_params)``.
        state: the optimizer's state after the last step (``SGDState``, ``AdamState``, ...).
        buffers: the threaded buffers after the last step (``None`` unless ``buffers`` was given).
    """

    theta: Tensor
    state: OptimizerState
    buffers: Buffers


@overload
def unroll(
    inner_loss: InnerLoss,
    theta: Tensor,
    batches: Iterable[object],
    *,
    optimizer: str | InnerOptimizer = "sgd",
    memory: Memory = "checkpoint",
    state: OptimizerState = None,
    buffers: Buffers = None,
    segment: int = 1,
    inner_segment: int | None = None,
    window: int | None = None,
    prox: float | None = None,
    cg_steps: int = 20,
    return_state: Literal[False] = False,
    **hyperparameters: object,
) -> Tensor: ...


@overload
def unroll(
    inner_loss: InnerLoss,
    theta: Tensor,
    batches: Iterable[object],
    *,
    optimizer: str | InnerOptimizer = "sgd",
    memory: Memory = "checkpoint",
    state: OptimizerState = None,
    buffers: Buffers = None,
    segment: int = 1,
    inner_segment: int | None = None,
    window: int | None = None,
    prox: float | None = None,
    cg_steps: int = 20,
    return_state: Literal[True],
    **hyperparameters: object,
) -> Unrolled: ...


@overload
def unroll(
    inner_loss: InnerLoss,
    theta: Tensor,
    batches: Iterable[object],
    *,
    optimizer: str | InnerOptimizer = "sgd",
    memory: Memory = "checkpoint",
    state: OptimizerState = None,
    buffers: Buffers = None,
    segment: int = 1,
    inner_segment: int | None = None,
    window: int | None = None,
    prox: float | None = None,
    cg_steps: int = 20,
    return_state: bool = False,
    **hyperparameters: object,
) -> Tensor | Unrolled: ...


def unroll(
    inner_loss: InnerLoss,
    theta: Tensor,
    batches: Iterable[object],
    *,
    optimizer: str | InnerOptimizer = "sgd",
    memory: Memory = "checkpoint",
    state: OptimizerState = None,
    buffers: Buffers = None,
    segment: int = 1,
    inner_segment: int | None = None,
    window: int | None = None,
    prox: float | None = None,
    cg_steps: int = 20,
    return_state: bool = False,
    **hyperparameters: object,
) -> Tensor | Unrolled:
    """Run ``len(batches)`` differentiable inner optimizer steps from ``theta``.

    Step ``t`` is ``theta, state = optimizer(theta, grad, state, **hyperparameters)`` with
    ``grad`` the gradient of ``inner_loss(theta, batches[t])`` w.r.t. ``theta``. The result is
    differentiable w.r.t. ``theta``, the hyperparameters given as tensors (a learned learning
    rate, one per parameter with :meth:`FlatLayout.expand`), and every tensor of the batches
    (distilled images, soft labels), exactly as the plain loop with ``create_graph=True``
    (``memory="full"`` and ``"checkpoint"``) or approximately (``"truncated"``, ``"implicit"``).

    Args:
        inner_loss: ``inner_loss(theta, batch) -> scalar`` calling the module with the vector
            it is given (``r(x, flat_param=theta)``); with ``buffers``,
            ``inner_loss(theta, batch, buffers) -> (scalar, new_buffers)``. For a population,
            the sum of the members' losses.
        theta: the start ``(num_params,)``, or ``(population, num_params)`` (a meta-batch of
            tasks: every member its own loop).
        batches: one batch per step, any nesting of tensors; the same tensors may repeat.
        optimizer: ``"sgd"`` (``lr``, ``momentum``, ``dampening``, ``nesterov``,
            ``weight_decay``), ``"adam"`` (``lr``, ``betas``, ``eps``, ``weight_decay``), or
            a function with the signature of :func:`~torchreparam.sgd`.
        memory: ``"full"`` keeps every step's graph (differentiable twice); ``"checkpoint"``
            keeps the vector and state every ``segment`` steps and recomputes one segment at a
            time during backward (the same gradient, once differentiable; with
            ``inner_segment``, in two levels); ``"truncated"`` differentiates through the last
            ``window`` steps only (earlier steps pass the gradient to ``theta`` unchanged, as
            first-order MAML); ``"implicit"`` (iMAML) adds
            ``prox / 2 * ||theta - theta_0||^2`` to every step's loss and differentiates at the
            optimum by conjugate gradients (``cg_steps``; exact only at the optimum).
        state: the optimizer's state to start from (``None``: a fresh one): an
            ``SGDState``/``AdamState``, or a custom optimizer's own (a tensor, or a tuple or
            dict of them).
        buffers: buffers threaded through the steps (BatchNorm's running statistics with
            :meth:`ReparamModule.pure`, a ``{name: tensor}`` dict), for the modes that
            recompute steps.
        segment: ``"checkpoint"``: steps per stored vector (memory ``K / segment`` vectors plus
            one segment's graph).
        inner_segment: ``"checkpoint"``: two-level checkpointing. During backward each segment
            is first swept again without a graph, keeping the vector and state every
            ``inner_segment`` steps, then recomputed ``inner_segment`` steps at a time with
            their graph: memory ``K / segment + segment / inner_segment`` vectors plus
            ``inner_segment`` steps' graph, for one more graph-free pass over the steps. An int
            in ``[1, segment]``; ``None`` (default): one level. For the least memory:
            ``segment`` about ``sqrt(K)`` and ``inner_segment=1``.
        window: ``"truncated"``: the number of last steps differentiated through.
        prox: ``"implicit"``: the strength of the proximal term (> 0).
        cg_steps: ``"implicit"``: at most this many conjugate-gradient iterations.
        return_state: return :class:`Unrolled` ``(theta, state, buffers)``.
        **hyperparameters: the optimizer's, as numbers or tensors (``betas``: a tuple).

    Returns:
        The vector after the last step, or :class:`Unrolled` with ``return_state=True``.

    Raises:
        ValueError: a bad argument (before any step runs); a loss that the recomputing modes
            cannot recompute (reads tensors requiring grad from a closure, changes buffers in
            place): the message says what to do.

    Example:
        >>> import torch
        >>> from torchreparam import ReparamModule, unroll
        >>> r = ReparamModule(torch.nn.Linear(3, 1))
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def inner_loss(theta, batch):
        ...     return ((r(batch[0], flat_param=theta) - batch[1]) ** 2).mean()
        >>> theta0 = r.flat_param.detach().requires_grad_()
        >>> theta = unroll(inner_loss, theta0, [(x, y)] * 50, memory="checkpoint", lr=0.1)
        >>> theta.grad_fn is not None
        True
    """
    if not callable(inner_loss):
        raise TypeError(
            f"inner_loss must be a function inner_loss(theta, batch) -> scalar, but got "
            f"{type(inner_loss).__name__}"
        )
    update, hyper = _optimizer(optimizer, hyperparameters)
    steps = _batches(batches)
    _check(theta, memory, segment, inner_segment, window, prox, cg_steps, len(steps))
    step = Step(inner_loss, update, buffers is not None)
    if memory == "full" or not steps:
        out = _full(step, theta, state, steps, buffers, hyper)
    elif memory == "checkpoint":
        inputs = Inputs(theta, state, steps, hyper)
        out = checkpointed(step, inputs, buffers, segment, inner_segment)
    elif memory == "truncated":
        assert window is not None
        out = _truncated(step, theta, state, steps, buffers, hyper, window)
    else:
        assert prox is not None
        _refuse_hyper_grads(state, hyper)
        out = implicit(step, Inputs(theta, state, steps, hyper), buffers, prox, cg_steps)
    return Unrolled(*out) if return_state else out[0]


def _full(
    step: Step,
    theta: Tensor,
    state: OptimizerState,
    steps: list[Any],
    buffers: Buffers,
    hyper: dict[str, Any],
) -> tuple[Tensor, Any, Any]:
    graph = torch.is_grad_enabled()
    for batch in steps:
        theta, state, buffers = step(theta, state, batch, buffers, hyper, graph=graph)
    return theta, state, buffers


def _truncated(
    step: Step,
    theta: Tensor,
    state: Any,
    steps: list[Any],
    buffers: Any,
    hyper: dict[str, Any],
    window: int,
) -> tuple[Tensor, Any, Any]:
    start = theta
    cut = len(steps) - window
    for batch in steps[:cut]:
        theta, state, buffers = step(theta, state, batch, buffers, hyper, graph=False)
    if cut > 0 and start.requires_grad:  # the earlier steps' Jacobian taken as the identity
        theta = theta.detach() + (start - start.detach())
    return _full(step, theta, state, steps[cut:], buffers, hyper)


def _optimizer(
    optimizer: str | Callable[..., tuple[Tensor, Any]], hyper: dict[str, Any]
) -> tuple[Callable[..., tuple[Tensor, Any]], dict[str, Any]]:
    if isinstance(optimizer, str):
        if optimizer not in _OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {sorted(_OPTIMIZERS)} or a step function like "
                f"torchreparam.sgd, but got {optimizer!r}"
            )
        update = _OPTIMIZERS[optimizer]
    elif callable(optimizer):
        update = optimizer
    else:
        raise TypeError(f"optimizer must be a name or a function, got {type(optimizer).__name__}")
    try:
        params = inspect.signature(update).parameters
    except (TypeError, ValueError):
        return update, hyper
    known = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(hyper) - known) if not takes_any else []
    missing = sorted(
        n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and p.default is p.empty
    )
    missing = [n for n in missing if n not in hyper]
    if unknown or missing:
        what = f"unknown {unknown}" if unknown else f"missing {missing}"
        raise TypeError(
            f"hyperparameters for optimizer {getattr(update, '__name__', update)!r}: {what}; "
            f"it takes {sorted(known)}"
        )
    return update, hyper


def _batches(batches: Iterable[Any]) -> list[Any]:
    if isinstance(batches, Tensor) or not isinstance(batches, Iterable):
        raise TypeError(
            "batches must be a sequence with one batch per inner step (a list of tensors or "
            f"of tuples of tensors), but got {type(batches).__name__}; for K steps on one "
            "batch, pass [batch] * K"
        )
    return list(batches)


def _check(
    theta: Any,
    memory: str,
    segment: int,
    inner_segment: int | None,
    window: int | None,
    prox: float | None,
    cg_steps: int,
    steps: int,
) -> None:
    if not isinstance(theta, Tensor) or not theta.is_floating_point() or theta.dim() not in (1, 2):
        found = f"shape {tuple(theta.shape)}, {theta.dtype}" if isinstance(theta, Tensor) else theta
        raise ValueError(
            "theta must be a floating-point vector (num_params,) or a population "
            f"(population, num_params), but got {found}"
        )
    if memory not in _MODES:
        raise ValueError(f"memory must be one of {list(_MODES)}, but got {memory!r}")
    _only(memory, "checkpoint", "segment", segment != 1)
    _only(memory, "checkpoint", "inner_segment", inner_segment is not None)
    _only(memory, "truncated", "window", window is not None)
    _only(memory, "implicit", "prox", prox is not None)
    _only(memory, "implicit", "cg_steps", cg_steps != 20)
    if isinstance(segment, bool) or not isinstance(segment, int) or segment < 1:
        raise ValueError(
            f"segment must be a positive int (steps per stored vector), got {segment!r}"
        )
    if inner_segment is not None and (
        isinstance(inner_segment, bool)
        or not isinstance(inner_segment, int)
        or not 1 <= inner_segment <= segment
    ):
        raise ValueError(
            "inner_segment must be an int in [1, segment] (steps per carry kept while a "
            f"segment is recomputed; segment={segment!r}), or None, but got {inner_segment!r}"
        )
    if memory == "truncated" and (not isinstance(window, int) or not 0 <= window <= steps):
        raise ValueError(
            f"memory='truncated' needs window=W, the number of last steps to differentiate "
            f"through, an int in [0, {steps}] (the number of batches); got {window!r}"
        )
    if memory == "implicit" and (
        isinstance(prox, bool) or not isinstance(prox, int | float) or prox <= 0
    ):
        raise ValueError(
            "memory='implicit' needs prox=lambda > 0, the strength of the proximal term "
            "lambda / 2 * ||theta - theta_0||^2 that keeps the inner optimum near theta_0; "
            f"got {prox!r}"
        )
    if not isinstance(cg_steps, int) or cg_steps < 1:
        raise ValueError(f"cg_steps must be a positive int, got {cg_steps!r}")


def _only(memory: str, mode: str, name: str, given: bool) -> None:
    if given and memory != mode:
        raise ValueError(f"{name} applies to memory={mode!r} only, but memory={memory!r}")


def _refuse_hyper_grads(state: Any, hyper: dict[str, Any]) -> None:
    needs = [t for t in tree_leaves((state, hyper)) if isinstance(t, Tensor) and t.requires_grad]
    if needs and torch.is_grad_enabled():
        raise ValueError(
            "memory='implicit' differentiates at the inner optimum, which does not depend on the "
            "optimizer's hyperparameters or initial state: a tensor of them requires grad "
            f"(shape {tuple(needs[0].shape)}). Use memory='checkpoint' to learn them, or detach"
        )
