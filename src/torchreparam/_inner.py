"""Differentiable inner-loop steps over one flat vector: SGD (with momentum) and Adam.

Pure functions of ``(theta, grad, state, hyperparameters)`` returning the new vector and state;
nothing is updated in place, so gradients flow through every step (MAML, dataset distillation)
and into hyperparameters given as tensors that require grad (a learned learning rate, or one
per layer expanded with :meth:`FlatLayout.expand`). The arithmetic follows ``torch.optim.SGD``
and ``torch.optim.Adam`` step for step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["AdamState", "SGDState", "adam", "sgd"]

Hyper = float | Tensor  # a number, a scalar tensor, or a (num_params,) tensor


class SGDState(NamedTuple):
    """State of :func:`sgd`: the momentum buffer (``None`` before the first step)."""

    momentum_buffer: Tensor | None = None


class AdamState(NamedTuple):
    """State of :func:`adam`: step count and the two moment estimates ``(num_params,)``."""

    step: int
    exp_avg: Tensor
    exp_avg_sq: Tensor


def _check(theta: Tensor, grad: Tensor) -> None:
    if not isinstance(theta, Tensor) or not isinstance(grad, Tensor):
        raise TypeError("theta and grad must be tensors")
    if grad.shape != theta.shape:
        found = f"grad has shape {tuple(grad.shape)} but theta has {tuple(theta.shape)}"
        raise ValueError(f"{found}: they must match")


def sgd(
    theta: Tensor,
    grad: Tensor,
    state: SGDState | None = None,
    *,
    lr: Hyper,
    momentum: Hyper = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: Hyper = 0.0,
) -> tuple[Tensor, SGDState]:
    """One SGD step (as ``torch.optim.SGD``), differentiable in everything.

    Args:
        theta: the flat vector ``(num_params,)`` (or any shape matching ``grad``).
        grad: its gradient, same shape.
        state: from the previous step; ``None`` at the first.
        lr: learning rate: a number or a tensor (scalar or ``(num_params,)``, may require grad).
        momentum: momentum factor (number or tensor, as ``lr``); 0 disables the buffer.
        dampening: dampening of the momentum buffer's update.
        nesterov: use Nesterov momentum.
        weight_decay: L2 penalty added to the gradient (number or tensor, as ``lr``).

    Returns:
        ``(new_theta, new_state)``.

    Example:
        >>> import torch
        >>> from torchreparam import sgd
        >>> theta, state = sgd(torch.ones(3), torch.full((3,), 2.0), lr=0.5)
        >>> theta
        tensor([0., 0., 0.])
    """
    _check(theta, grad)
    step = grad if _is_zero(weight_decay) else grad + weight_decay * theta
    buffer = None
    if not _is_zero(momentum):
        previous = None if state is None else state.momentum_buffer
        buffer = step if previous is None else momentum * previous + (1 - dampening) * step
        step = step + momentum * buffer if nesterov else buffer
    return _descend(theta, lr, step), SGDState(buffer)


def adam(
    theta: Tensor,
    grad: Tensor,
    state: AdamState | None = None,
    *,
    lr: Hyper = 1e-3,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: Hyper = 0.0,
) -> tuple[Tensor, AdamState]:
    """One Adam step (as ``torch.optim.Adam``, without amsgrad), differentiable in everything.

    Args:
        theta: the flat vector ``(num_params,)``.
        grad: its gradient, same shape.
        state: from the previous step; ``None`` at the first (zero moments).
        lr: learning rate: a number or a tensor (scalar or ``(num_params,)``, may require grad).
        betas: decay rates of the two moment estimates (numbers or tensors).
        eps: added to the denominator.
        weight_decay: L2 penalty added to the gradient (number or tensor, as ``lr``).

    Returns:
        ``(new_theta, new_state)``.
    """
    _check(theta, grad)
    if state is None:
        state = AdamState(0, torch.zeros_like(theta), torch.zeros_like(theta))
    beta1, beta2 = betas
    g = grad if _is_zero(weight_decay) else grad + weight_decay * theta
    step = state.step + 1
    exp_avg = state.exp_avg + (1 - beta1) * (g - state.exp_avg)  # torch: lerp_(g, 1 - beta1)
    exp_avg_sq = beta2 * state.exp_avg_sq + (1 - beta2) * g * g
    correction1 = 1 - beta1**step
    correction2 = 1 - beta2**step
    denom = exp_avg_sq.sqrt() / _sqrt(correction2) + eps
    return theta - (lr / correction1) * exp_avg / denom, AdamState(step, exp_avg, exp_avg_sq)


def _descend(theta: Tensor, lr: Hyper, step: Tensor) -> Tensor:
    """``theta - lr * step`` as one op (one node in a graph that MAML differentiates twice)."""
    if isinstance(lr, Tensor):
        return torch.addcmul(theta, lr, step, value=-1)
    return torch.add(theta, step, alpha=-lr)


def _is_zero(value: Hyper) -> bool:
    return not isinstance(value, Tensor) and value == 0


def _sqrt(value: Hyper) -> Hyper:
    return value.sqrt() if isinstance(value, Tensor) else value**0.5
