"""The tensors an unrolled loop depends on, each once, for an ``autograd.Function``.

``theta_0``, the tensors of the initial optimizer state, of every batch and of the
hyperparameters become one list (a tensor that appears in many batches, as a distilled dataset
does at every step, appears once, so its gradient is accumulated once); the trees keep
:class:`Ref` placeholders and are rebuilt with any list of the same length: detached copies
for a forward sweep, fresh leaves for a recomputation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_map

__all__ = ["Inputs", "add_grad"]


class Ref:
    """Where a tensor of a tree sits in :attr:`Inputs.tensors`."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class Inputs:
    """``theta_0`` (index 0) and the other tensors of the loop's inputs, each once."""

    def __init__(self, theta: Tensor, state: Any, batches: Sequence[Any], hyper: Any) -> None:
        self.tensors: list[Tensor] = [theta]
        self._index = {id(theta): 0}
        self.state = tree_map(self._ref, state)
        self.batches = [tree_map(self._ref, b) for b in batches]
        self.hyper = tree_map(self._ref, hyper)
        self.state_indices = [  # the floating-point ones: those that carry gradients
            x.index for x in _refs(self.state) if self.tensors[x.index].is_floating_point()
        ]
        self.versions = [t._version for t in self.tensors]

    def _ref(self, x: Any) -> Any:
        if not isinstance(x, Tensor):
            return x
        i = self._index.get(id(x))
        if i is None:
            i = self._index[id(x)] = len(self.tensors)
            self.tensors.append(x)
        return Ref(i)

    @staticmethod
    def build(tree: Any, tensors: Sequence[Tensor]) -> Any:
        """``tree`` with every placeholder replaced by its tensor from ``tensors``."""
        return tree_map(lambda x: tensors[x.index] if isinstance(x, Ref) else x, tree)

    def check_unchanged(self) -> None:
        """Raise if a tensor was modified in place since the forward sweep (as autograd does)."""
        for i, (t, version) in enumerate(zip(self.tensors, self.versions, strict=True)):
            if t._version != version:
                what = "theta_0" if i == 0 else "a tensor of the batches or hyperparameters"
                raise RuntimeError(
                    f"{what} (shape {tuple(t.shape)}) was modified in place after unroll() "
                    f"returned (version {version}, now {t._version}), so its gradient cannot be "
                    "computed: call backward before changing it (step the outer optimizer after "
                    "the backward), or pass a copy"
                )


def _refs(tree: Any) -> list[Ref]:
    found: list[Ref] = []
    tree_map(lambda x: found.append(x) if isinstance(x, Ref) else None, tree)
    return found


def add_grad(total: Tensor | None, g: Tensor | None) -> Tensor | None:
    """``total + g`` where ``None`` is no gradient yet."""
    if g is None:
        return total
    return g if total is None else total + g
