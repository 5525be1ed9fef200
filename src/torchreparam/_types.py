"""The named types of the public signatures: what ``buffers``, ``in_dims`` and a call's output
may be. Defined once here (no torchreparam imports: every layer may use them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeAlias

from torch import Tensor

__all__ = ["Buffers", "InDims", "Output"]

Buffers: TypeAlias = Sequence[Tensor] | Mapping[str, Tensor] | None
"""Buffers for one call, in place of the module's own: a sequence of all of them in
``module.buffers()`` order, a mapping ``{name: tensor}`` (names as in ``module.named_buffers()``)
for some of them (the others are the module's own), or ``None`` for the module's own. In a
population call each tensor may be ``(population, *shape)``: one per member."""

InDims: TypeAlias = (
    Literal[0] | tuple[Literal[0] | None, ...] | Mapping[int | str, Literal[0] | None] | None
)
"""Which inputs of a population call carry a leading population dimension (one slice per
member), as ``torch.func.vmap``'s ``in_dims``: ``None`` (none: every input is shared by all
members), ``0`` (every positional input), a tuple of ``0``/``None`` with one entry per
positional input, or a dict ``{position or keyword name: 0 or None}`` (inputs it does not name
are shared)."""

Output: TypeAlias = Any
"""Whatever the wrapped module's ``forward`` returns (a tensor, a tuple, a dict, a model output
object). For a population, the members' outputs stacked: each tensor on a new leading dimension
``(population, ...)``, each other value as the list of the members' values."""

# typing's unions keep no docstring of their own; help(InDims) and inspect.getdoc read this one
InDims.__doc__ = "Which inputs of a population call carry a leading population dimension."
