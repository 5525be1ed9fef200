"""One step of an unrolled inner loop, and the checks that make recomputing it safe.

A step is ``theta, state = update(theta, grad of inner_loss(theta, batch), state, **hyper)``.
:class:`Step` runs it either differentiably in everything (``graph=True``: the inner gradient
with ``create_graph``) or without recording anything (``graph=False``: the vector is a fresh
leaf, the update runs under ``no_grad``), which is what the memory modes that keep no graph for
their forward sweep use. Those modes recompute steps later, so they must know that a step is a
function of its declared inputs: :func:`foreign_leaf` finds a tensor that requires grad but
reached the loss some other way (a closure), :class:`MutationProbe` finds tensors the loss
changed in place (BatchNorm's running statistics), and :class:`Rng` replays random draws.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "MutationProbe",
    "Rng",
    "Step",
    "foreign_leaf",
    "grad_of",
    "refuse_foreign",
]


@dataclass(frozen=True)
class Step:
    """``inner_loss`` and ``update`` (``sgd``, ``adam`` or alike), as one step of the loop."""

    inner_loss: Callable[..., Any]
    update: Callable[..., tuple[Tensor, Any]]
    threads_buffers: bool  # inner_loss(theta, batch, buffers) -> (loss, new buffers)

    def loss(self, theta: Tensor, batch: Any, buffers: Any) -> tuple[Tensor, Any]:
        """The inner loss (a scalar) and the buffers the next step gets."""
        if self.threads_buffers:
            out = self.inner_loss(theta, batch, buffers)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    "with buffers=..., inner_loss(theta, batch, buffers) must return "
                    f"(loss, new_buffers), but it returned {type(out).__name__}; "
                    "for example: out, new = r.pure(x, flat_param=theta, buffers=buffers)"
                )
            loss, buffers = out
        else:
            loss = self.inner_loss(theta, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            found = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss)
            raise TypeError(
                f"inner_loss must return a scalar tensor, but it returned {found}; "
                "for a population, return the sum of the members' losses"
            )
        return loss, buffers

    def __call__(
        self,
        theta: Tensor,
        state: Any,
        batch: Any,
        buffers: Any,
        hyper: dict[str, Any],
        *,
        graph: bool,
        check: Sequence[Tensor] | None = None,
    ) -> tuple[Tensor, Any, Any]:
        """One step; ``check``: refuse a loss that reads tensors requiring grad other than
        ``theta`` and these (the inputs made leaves)."""
        if graph:
            leaf = theta if theta.requires_grad else theta.detach().requires_grad_()
            loss, buffers = self.loss(leaf, batch, buffers)
            g = grad_of(loss, leaf, create_graph=True)
            theta, state = self.update(theta, g, state, **hyper)
            return theta, state, buffers
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_()
            loss, buffers = self.loss(leaf, batch, buffers)
            if check is not None:
                refuse_foreign(loss, [leaf, *check])
            g = grad_of(loss, leaf)
        with torch.no_grad():
            theta, state = self.update(theta, g, state, **hyper)
        return theta, state, buffers


def grad_of(loss: Tensor, theta: Tensor, create_graph: bool = False) -> Tensor:
    """The inner loss's gradient w.r.t. ``theta``; a clear error if it does not depend on it."""
    if loss.requires_grad:
        g = torch.autograd.grad(loss, theta, create_graph=create_graph, allow_unused=True)[0]
    else:
        g = None
    if g is None:
        raise ValueError(
            "inner_loss(theta, batch) does not depend on theta: call the module with the "
            "vector it is given, r(x, flat_param=theta)"
        )
    return g


def foreign_leaf(loss: Tensor, allowed: Sequence[Tensor]) -> Tensor | None:
    """A tensor that requires grad, reached by ``loss``'s graph, other than ``allowed``."""
    known = {id(t) for t in allowed}
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad: a leaf that requires grad
        if variable is not None and id(variable) not in known:
            return variable
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return None


def refuse_foreign(loss: Tensor, allowed: Sequence[Tensor]) -> None:
    """Raise if the loss reads a tensor that requires grad other than through its inputs."""
    found = foreign_leaf(loss, allowed)
    if found is not None:
        raise ValueError(
            "inner_loss reads a tensor that requires grad but is not among its inputs "
            f"(shape {tuple(found.shape)}, {found.dtype}): the memory modes that recompute "
            "steps can only differentiate w.r.t. theta, the batches and the hyperparameters. "
            "Pass it inside the batches (or as a hyperparameter), call the module with "
            "flat_param=theta (not its own weights), or use memory='full'"
        )


class MutationProbe(TorchDispatchMode):
    """Refuses, before it happens, an in-place write to a tensor that existed before the probe
    started (``mode``: the memory mode, for the message)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.created: set[int] = set()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            for t in value if isinstance(value, list | tuple) else (value,):
                if isinstance(t, Tensor) and t.numel() and _storage(t) not in self.created:
                    _refuse_mutation(t, self.mode)
        out = func(*args, **kwargs)
        self.created.update(_storage(t) for t in tree_leaves(out) if isinstance(t, Tensor))
        return out


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.numel() else 0


def _refuse_mutation(t: Tensor, mode: str) -> None:
    raise ValueError(
        f"inner_loss changes a tensor it did not create in place (shape {tuple(t.shape)}, "
        f"{t.dtype}; BatchNorm's running statistics in train mode do this), and memory={mode!r} "
        "evaluates the loss again during backward, which would change it again; refused "
        "before the change. Thread such buffers through the loop (buffers=..., with an "
        "inner_loss(theta, batch, buffers) that returns r.pure(...)'s new buffers), put those "
        "modules in eval mode, or use memory='full'"
    )


class Rng:
    """The default generators' states before a step, kept only if the step drew from them."""

    def __init__(self, theta: Tensor) -> None:
        self.devices = [theta.device] if theta.device.type == "cuda" else []

    def state(self) -> tuple[Tensor, ...]:
        cuda = tuple(torch.cuda.get_rng_state(d) for d in self.devices)
        return (torch.get_rng_state(), *cuda)

    def if_drawn(self, before: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
        """``before`` if the generators moved since, else ``None`` (nothing to replay)."""
        after = self.state()
        moved = any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        return before if moved else None

    @contextmanager
    def replay(self, saved: tuple[Tensor, ...] | None) -> Iterator[None]:
        """Within the block the generators start from ``saved``; restored after."""
        if saved is None:
            with nullcontext():
                yield
            return
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(saved[0])
            for device, s in zip(self.devices, saved[1:], strict=True):
                torch.cuda.set_rng_state(s, device)
            yield
