"""``memory="checkpoint"``: the exact gradient of an unrolled loop without keeping its graph.

The forward sweep runs every step without recording a graph and keeps the carry (the vector,
the optimizer state, threaded buffers) at the start of every segment of ``segment`` steps.
The backward walks the segments from the last: it recomputes one segment with its graph
(``create_graph`` inner gradients, as the full unroll builds them), takes the vector-Jacobian
product of the segment's end carry with the adjoint that arrived there, and hands the adjoint
of the segment's start carry to the segment before. The gradients w.r.t. the batches'
tensors and the hyperparameters are summed over segments. Memory: the stored carries plus one
segment's graph; time: every step runs twice, once without a graph.

A recomputed segment must reproduce the forward sweep, so the forward sweep refuses a loss that
reads tensors requiring grad from a closure or changes tensors in place, random draws of the
default generators are replayed, and each recomputed segment's end is compared with the stored
one: a loss that is not a function of its inputs is refused, never differentiated wrongly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._unroll_inputs import Inputs, add_grad
from ._unroll_step import MutationProbe, Rng, Step

__all__ = ["Plan", "checkpointed"]

MODE = "checkpoint"

Carry = tuple[Tensor, Any, Any]  # (theta, optimizer state, threaded buffers)


class Plan:
    """What the forward sweep needs and what it leaves for the backward."""

    def __init__(self, step: Step, inputs: Inputs, buffers: Any, segment: int) -> None:
        self.step, self.inputs, self.buffers, self.segment = step, inputs, buffers, segment
        self.stored: dict[int, Carry] = {}
        self.rng: list[tuple[Tensor, ...] | None] = []
        self.end: Carry | None = None

    def forward(self, tensors: tuple[Tensor, ...], needs: tuple[bool, ...]) -> Carry:
        inputs, step = self.inputs, self.step
        # Leaves that require grad where the recomputation will want their gradient: kernels
        # may differ with requires_grad (vmap's batching of a linear layer does, in the last
        # bits, enough to flip a ReLU), and the recomputation must reproduce this sweep.
        detached = [t.detach().requires_grad_(n) for t, n in zip(tensors, needs, strict=True)]
        leaves = [t for t in detached if t.requires_grad]
        hyper = inputs.build(inputs.hyper, detached)
        start = tensors[0].detach()
        carry: Carry = (start, inputs.build(inputs.state, detached), self.buffers)
        rng = Rng(start)
        bank = _Bank(-(-len(inputs.batches) // self.segment))
        for t, batch in enumerate(inputs.batches):
            if t % self.segment == 0:
                self.stored[t] = bank.keep(t // self.segment, carry)
            before = rng.state()
            probe = MutationProbe(MODE) if t == 0 else None
            with probe if probe is not None else torch.enable_grad():
                carry = step(*carry[:2], inputs.build(batch, detached), carry[2], hyper,
                             graph=False, check=leaves)  # fmt: skip
            self.rng.append(rng.if_drawn(before))
        # kept detached: the outputs themselves on the plan (held by ctx) would make a cycle
        self.end = (carry[0].detach(), tree_map(_detach, carry[1]), carry[2])
        return carry

    def backward(self, needs: tuple[bool, ...], adjoint: list[Tensor | None]) -> list[Any]:
        """Gradients for every input tensor; ``adjoint``: of ``theta_K`` and the state's tensors."""
        inputs = self.inputs
        inputs.check_unchanged()
        grads: list[Tensor | None] = [None] * len(inputs.tensors)
        starts = sorted(self.stored, reverse=True)
        ends = [len(inputs.batches), *starts[:-1]]
        for start, end in zip(starts, ends, strict=True):
            adjoint = self._segment(start, end, needs, adjoint, grads)
        for i, a in zip([0, *inputs.state_indices], adjoint, strict=True):
            grads[i] = add_grad(grads[i], a)
        return [g if need else None for g, need in zip(grads, needs, strict=True)]

    def _segment(
        self,
        start: int,
        end: int,
        needs: tuple[bool, ...],
        adjoint: list[Tensor | None],
        grads: list[Tensor | None],
    ) -> list[Tensor | None]:
        inputs, step = self.inputs, self.step
        theta, state, buffers = self.stored[start]
        leaves = [t.detach().requires_grad_(n) for t, n in zip(inputs.tensors, needs, strict=True)]
        wanted = [i for i, n in enumerate(needs) if n]
        rng = Rng(theta)
        with torch.enable_grad():
            theta0 = theta.detach().requires_grad_()
            state_leaves, spec = tree_flatten(state)
            state_leaves = [_leaf(x) for x in state_leaves]
            carry: Carry = (theta0, tree_unflatten(state_leaves, spec), buffers)
            hyper = inputs.build(inputs.hyper, leaves)
            for t in range(start, end):
                with rng.replay(self.rng[t]):
                    carry = step(*carry[:2], inputs.build(inputs.batches[t], leaves), carry[2],
                                 hyper, graph=True)  # fmt: skip
        self._check_reproduced(carry[0], theta, end)
        outs, outs_adjoint = _pairs([carry[0], *_tensors(carry[1])], adjoint)
        starts = [theta0, *_tensors(state_leaves)]
        if not outs:  # no adjoint reached this segment's end: nothing flows further back
            return [None] * len(starts)
        found = torch.autograd.grad(
            outs, [*starts, *(leaves[i] for i in wanted)], outs_adjoint, allow_unused=True
        )
        for i, g in zip(wanted, found[len(starts) :], strict=True):
            grads[i] = add_grad(grads[i], g)
        return list(found[: len(starts)])

    def _check_reproduced(self, theta: Tensor, before: Tensor, end: int) -> None:
        stored = self.end if end == len(self.inputs.batches) else self.stored[end]
        assert stored is not None
        with torch.no_grad():
            error = (theta - stored[0]).abs().max()
            move = (stored[0] - before).abs().max()
            scale = stored[0].abs().max()
            eps = torch.finfo(theta.dtype).eps
            if error > 1e-3 * move + 1e3 * eps * scale:
                raise RuntimeError(
                    f"recomputing inner steps up to step {end} during backward gave another "
                    f"vector than the forward sweep (max difference {error.item():.3g}, the "
                    f"steps moved it by {move.item():.3g}): inner_loss is not a function of "
                    "(theta, batch) alone. It may draw random numbers from its own "
                    "torch.Generator (draw them in the batches instead), or read a tensor that "
                    "changed after unroll() returned. Use memory='full' for such a loss"
                )


class _Bank:
    """The stored carries' tensors in rows of one preallocated tensor each: one allocation
    per tensor of the carry, not one per stored step between every step's temporaries (which
    fragments the heap: measured 47 MB instead of 30 MB for 80 more stored vectors)."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.rows: dict[tuple[Any, ...], Tensor] = {}

    def keep(self, slot: int, carry: Carry) -> Carry:
        leaves, spec = tree_flatten(carry[:2])
        kept = []
        for position, x in enumerate(leaves):
            if _floating(x):
                key = (position, x.shape, x.dtype, x.device)
                rows = self.rows.get(key)
                if rows is None:
                    rows = self.rows[key] = x.new_empty((self.slots, *x.shape))
                x = rows[slot].copy_(x)
            kept.append(x)
        theta, state = tree_unflatten(kept, spec)
        return theta, state, carry[2]


def _floating(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


def _leaf(x: Any) -> Any:
    return x.detach().requires_grad_() if _floating(x) else x


def _tensors(tree: Any) -> list[Tensor]:
    """The floating-point tensors of ``tree`` (an optimizer state): what carries gradients."""
    return [x for x in tree_flatten(tree)[0] if _floating(x)]


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


def _pairs(outs: list[Tensor], adjoint: list[Tensor | None]) -> tuple[list[Tensor], list[Tensor]]:
    """The outputs that carry a graph and have an adjoint, with their adjoints."""
    kept = [(o, a) for o, a in zip(outs, adjoint, strict=True) if a is not None and o.requires_grad]
    return [o for o, _ in kept], [a for _, a in kept]


class _Checkpointed(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, plan: Plan, *tensors: Tensor) -> tuple[Tensor, ...]:
        theta, state, _ = plan.forward(tensors, ctx.needs_input_grad[1:])
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return (theta, *_tensors(state))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *adjoint: Tensor | None) -> tuple[Any, ...]:
        plan: Plan = ctx.plan
        return (None, *plan.backward(ctx.needs_input_grad[1:], list(adjoint)))


def checkpointed(step: Step, inputs: Inputs, buffers: Any, segment: int) -> Carry:
    """Run the loop; the returned vector and state differentiate through recomputation."""
    plan = Plan(step, inputs, buffers, segment)
    outs = _Checkpointed.apply(plan, *inputs.tensors)
    assert plan.end is not None
    _, state, buffers = plan.end
    leaves, spec = tree_flatten(state)
    it = iter(outs[1:])
    state = tree_unflatten([next(it) if _floating(x) else x for x in leaves], spec)
    return outs[0], state, buffers
