"""``memory="checkpoint"``: the exact gradient of an unrolled loop without keeping its graph.

The forward sweep runs every step without recording a graph and keeps the carry (the vector,
the optimizer state, threaded buffers) at the start of every segment of ``segment`` steps.
The backward walks the segments from the last: it recomputes one segment with its graph
(``create_graph`` inner gradients, as the full unroll builds them), takes the vector-Jacobian
product of the segment's end carry with the adjoint that arrived there, and hands the adjoint
of the segment's start carry to the segment before. The gradients w.r.t. the batches'
tensors and the hyperparameters are summed over segments. Memory: the stored carries plus one
segment's graph; time: every step runs twice, once without a graph.

With two levels (``inner``, the ``inner_segment`` of ``unroll``), a segment is not recomputed
with its whole graph: it is first swept again without a graph from its stored carry, keeping
the carry every ``inner`` steps in scratch rows that every segment reuses, and then the
sub-segments are recomputed with their graph from the last, as above. Memory: the stored
carries, one segment's scratch carries and ``inner`` steps' graph; time: one more
graph-free pass over every step.

A recomputed segment must reproduce the forward sweep, so the forward sweep refuses a loss that
reads tensors requiring grad from a closure or changes tensors in place, random draws of the
default generators are replayed, and each recomputed segment's end (and each second-level
sweep's) is compared with the stored one: a loss that is not a function of its inputs is
refused, never differentiated wrongly.
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
    """What the forward sweep needs and what it leaves for the backward.

    ``segment``: steps per stored carry; ``inner``: during backward, steps per carry kept
    while a segment is swept again without a graph (``None``: the segment's whole graph at
    once, no second sweep).
    """

    def __init__(
        self, step: Step, inputs: Inputs, buffers: Any, segment: int, inner: int | None = None
    ) -> None:
        self.step, self.inputs, self.buffers, self.segment = step, inputs, buffers, segment
        self.inner = inner if inner is not None and inner < segment else None
        self.stored: dict[int, Carry] = {}
        self.rng: list[tuple[Tensor, ...] | None] = []
        self.end: Carry | None = None
        self.scratch: _Bank | None = None  # the second level's carries, reused per segment

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
        # the inputs as leaves, requiring grad as in the forward sweep (the same kernels)
        leaves = [t.detach().requires_grad_(n) for t, n in zip(inputs.tensors, needs, strict=True)]
        starts = sorted(self.stored, reverse=True)
        ends = [len(inputs.batches), *starts[:-1]]
        for start, end in zip(starts, ends, strict=True):
            if all(a is None for a in adjoint):  # nothing flows further back
                adjoint = [None] * (1 + len(inputs.state_indices))
                break
            two_levels = self.inner is not None and end - start > self.inner
            carries = self._sweep(start, end, leaves) if two_levels else {}
            carries[start] = self.stored[start]
            sub_starts = sorted(carries, reverse=True)
            for sub_start, sub_end in zip(sub_starts, [end, *sub_starts[:-1]], strict=True):
                want = carries[sub_end][0] if sub_end in carries else self._stored(sub_end)[0]
                adjoint = self._segment(
                    carries[sub_start], sub_start, sub_end, want, leaves, adjoint, grads
                )
        for i, a in zip([0, *inputs.state_indices], adjoint, strict=True):
            grads[i] = add_grad(grads[i], a)
        return [g if need else None for g, need in zip(grads, needs, strict=True)]

    def _stored(self, t: int) -> Carry:
        stored = self.end if t == len(self.inputs.batches) else self.stored[t]
        assert stored is not None
        return stored

    def _sweep(self, start: int, end: int, leaves: list[Tensor]) -> dict[int, Carry]:
        """The second level: steps ``start..end`` again without a graph, keeping the carry at
        every ``inner``-th step after ``start`` (in scratch rows reused by every segment)."""
        inputs, step, inner = self.inputs, self.step, self.inner
        assert inner is not None
        if self.scratch is None:
            self.scratch = _Bank(-(-self.segment // inner) - 1)
        theta, state, buffers = self.stored[start]
        carry: Carry = (theta, state, buffers)
        hyper = inputs.build(inputs.hyper, leaves)
        rng = Rng(theta)
        kept: dict[int, Carry] = {}
        for t in range(start, end):
            if t > start and (t - start) % inner == 0:
                kept[t] = self.scratch.keep((t - start) // inner - 1, carry)
            with rng.replay(self.rng[t]):
                carry = step(*carry[:2], inputs.build(inputs.batches[t], leaves), carry[2],
                             hyper, graph=False)  # fmt: skip
        self._check_reproduced(carry[0], theta, self._stored(end)[0], end)
        return kept

    def _segment(
        self,
        carry: Carry,
        start: int,
        end: int,
        want: Tensor,
        leaves: list[Tensor],
        adjoint: list[Tensor | None],
        grads: list[Tensor | None],
    ) -> list[Tensor | None]:
        """Steps ``start..end`` from ``carry`` with their graph (``want``: the vector the
        sweep without a graph reached at ``end``); the adjoint at ``start``."""
        inputs, step = self.inputs, self.step
        theta, state, buffers = carry
        wanted = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
        rng = Rng(theta)
        with torch.enable_grad():
            theta0 = theta.detach().requires_grad_()
            state_leaves, spec = tree_flatten(state)
            state_leaves = [_leaf(x) for x in state_leaves]
            carry = (theta0, tree_unflatten(state_leaves, spec), buffers)
            hyper = inputs.build(inputs.hyper, leaves)
            for t in range(start, end):
                with rng.replay(self.rng[t]):
                    carry = step(*carry[:2], inputs.build(inputs.batches[t], leaves), carry[2],
                                 hyper, graph=True)  # fmt: skip
        self._check_reproduced(carry[0], theta, want, end)
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

    def _check_reproduced(self, theta: Tensor, before: Tensor, want: Tensor, end: int) -> None:
        with torch.no_grad():
            error = (theta - want).abs().max()
            move = (want - before).abs().max()
            scale = want.abs().max()
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


def checkpointed(
    step: Step, inputs: Inputs, buffers: Any, segment: int, inner: int | None = None
) -> Carry:
    """Run the loop; the returned vector and state differentiate through recomputation."""
    plan = Plan(step, inputs, buffers, segment, inner)
    outs = _Checkpointed.apply(plan, *inputs.tensors)
    assert plan.end is not None
    _, state, buffers = plan.end
    leaves, spec = tree_flatten(state)
    it = iter(outs[1:])
    state = tree_unflatten([next(it) if _floating(x) else x for x in leaves], spec)
    return outs[0], state, buffers
