"""``memory="implicit"``: the outer gradient at the inner optimum (iMAML), memory of one step.

The inner problem gets a proximal term: every step descends ``inner_loss(theta, batch) +
prox / 2 * ||theta - theta_0||^2``, run without a graph. If ``theta_K`` is its minimizer
``theta*`` (with ``L`` the mean inner loss over the batches), ``grad L(theta*) + prox (theta* -
theta_0) = 0``, and the implicit function theorem gives, for the adjoint ``v`` of ``theta_K``
and ``w = (H + prox I)^-1 v`` (``H`` the Hessian of ``L`` at ``theta*``, solved by conjugate
gradients on Hessian-vector products):

- the gradient w.r.t. ``theta_0``: ``prox * w``;
- the gradient w.r.t. a tensor ``x`` the loss reads: ``-(d/dx grad L(theta*, x)) . w``.

Exact only at the optimum; the number of steps never enters the memory. For a population
``(P, N)`` every member gets its own conjugate-gradient solve (the Hessian of the members'
summed losses is block diagonal).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._unroll_inputs import Inputs, add_grad
from ._unroll_step import MutationProbe, Step, grad_of

__all__ = ["implicit"]

MODE = "implicit"


def _proximal(
    update: Callable[..., tuple[Tensor, Any]],
    anchor: Tensor,
    prox: float | Tensor,
    theta: Tensor,
    grad: Tensor,
    state: Any,
    **hyper: Any,
) -> tuple[Tensor, Any]:
    return update(theta, grad + prox * (theta - anchor), state, **hyper)


class Plan:
    """The forward sweep and the implicit backward of one :func:`implicit` call."""

    def __init__(self, step: Step, inputs: Inputs, buffers: Any, prox: float, cg: int) -> None:
        self.step, self.inputs, self.buffers, self.prox, self.cg = step, inputs, buffers, prox, cg
        self.end: tuple[Tensor, Any, Any] | None = None

    def forward(self, tensors: tuple[Tensor, ...]) -> Tensor:
        inputs = self.inputs
        detached = [t.detach() for t in tensors]
        anchor = detached[0]
        step = Step(
            self.step.inner_loss,
            partial(_proximal, self.step.update, anchor, self.prox),
            self.step.threads_buffers,
        )
        hyper = inputs.build(inputs.hyper, detached)
        theta, state, buffers = anchor, inputs.build(inputs.state, detached), self.buffers
        for t, batch in enumerate(inputs.batches):
            probe = MutationProbe(MODE) if t == 0 else None
            with probe if probe is not None else torch.enable_grad():
                theta, state, buffers = step(theta, state, inputs.build(batch, detached), buffers,
                                             hyper, graph=False, check=())  # fmt: skip
        self.end = (theta.detach(), state, buffers)  # detached: no cycle through ctx
        return theta

    def backward(self, needs: tuple[bool, ...], v: Tensor) -> list[Tensor | None]:
        inputs, end = self.inputs, self.end
        assert end is not None
        inputs.check_unchanged()
        leaves = [t.detach().requires_grad_(n) for t, n in zip(inputs.tensors, needs, strict=True)]
        wanted = [i for i in range(1, len(leaves)) if needs[i]]
        with torch.enable_grad():
            theta = end[0].detach().requires_grad_()
            total = sum(
                (count / len(inputs.batches))
                * self.step.loss(theta, inputs.build(batch, leaves), end[2])[0]
                for batch, count in _distinct(inputs.batches)
            )
            assert isinstance(total, Tensor)
            g = grad_of(total, theta, create_graph=True)

            def hvp(p: Tensor) -> Tensor:
                (hp,) = torch.autograd.grad(g, theta, p, retain_graph=True, allow_unused=True)
                return p * self.prox if hp is None else hp + self.prox * p

            w = conjugate_gradient(hvp, v, self.cg)
            found = (
                torch.autograd.grad(g, [leaves[i] for i in wanted], w, allow_unused=True)
                if wanted
                else ()
            )
        grads: list[Tensor | None] = [None] * len(leaves)
        if needs[0]:
            grads[0] = self.prox * w
        for i, gx in zip(wanted, found, strict=True):
            grads[i] = add_grad(grads[i], None if gx is None else -gx)
        return grads


def _distinct(batches: list[Any]) -> list[tuple[Any, int]]:
    """Each batch once (batches made of the same tensors are one), with how often it occurs."""
    counts: dict[Any, list[Any]] = {}
    for batch in batches:
        key = repr(torch.utils._pytree.tree_map(lambda x: getattr(x, "index", x), batch))
        counts.setdefault(key, [batch, 0])[1] += 1
    return [(b, c) for b, c in counts.values()]


def conjugate_gradient(hvp: Callable[[Tensor], Tensor], b: Tensor, steps: int) -> Tensor:
    """Solve ``hvp(x) = b`` for every row of ``b`` (one system per population member)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = _dot(r, r)
    stop = rs * (1e-6) ** 2
    for _ in range(steps):
        hp = hvp(p)
        php = _dot(p, hp)
        alpha = torch.where(php != 0, rs / php, torch.zeros_like(rs))
        x = x + alpha * p
        r = r - alpha * hp
        rs_new = _dot(r, r)
        if bool((rs_new <= stop).all()):
            break
        p = r + torch.where(rs != 0, rs_new / rs, torch.zeros_like(rs)) * p
        rs = rs_new
    return x


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1, keepdim=True)


class _Implicit(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, plan: Plan, *tensors: Tensor) -> Tensor:
        ctx.plan = plan
        return plan.forward(tensors)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, v: Tensor) -> tuple[Any, ...]:
        plan: Plan = ctx.plan
        return (None, *plan.backward(ctx.needs_input_grad[1:], v))


def implicit(
    step: Step, inputs: Inputs, buffers: Any, prox: float, cg_steps: int
) -> tuple[Tensor, Any, Any]:
    """Run the proximal inner loop; ``theta_K`` differentiates implicitly."""
    plan = Plan(step, inputs, buffers, prox, cg_steps)
    theta = _Implicit.apply(plan, *inputs.tensors)
    assert plan.end is not None
    return theta, plan.end[1], plan.end[2]
