"""The flat layout: a value that says where each parameter lives in one flat vector.

The contract (kept from the original torchreparam so that saved weight trajectories stay
valid): the flat vector is ``torch.cat([p.reshape(-1) for p in module.parameters()])`` of the
unwrapped module, each tied (shared) parameter once, at its first occurrence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ._checks import one_of

__all__ = ["FlatLayout", "LayoutEntry", "Include"]

Include = Literal["all", "trainable"] | Callable[[str, nn.Parameter], bool] | None
"""Which parameters go into the flat vector: ``None``/``"all"``, ``"trainable"`` or a predicate."""


@dataclass(frozen=True)
class LayoutEntry:
    """Where one parameter lives in the flat vector.

    Attributes:
        name: the parameter's name in ``module.named_parameters()`` (its first occurrence).
        shape: the parameter's shape.
        offset: index of its first element in the flat vector.
        aliases: other names of the same (tied) parameter, in module order.
    """

    name: str
    shape: tuple[int, ...]
    offset: int
    aliases: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        """Number of elements, ``prod(shape)``."""
        return math.prod(self.shape)

    @property
    def slice(self) -> slice:
        """``slice(offset, offset + numel)``: this entry's part of a flat vector."""
        return slice(self.offset, self.offset + self.numel)


@dataclass(frozen=True)
class FlatLayout:
    """A frozen, hashable, picklable description of a flat parameter vector.

    Build one with :meth:`FlatLayout.from_module`; it holds no tensors, so it can be compared,
    used as a cache key, and saved beside a checkpoint.

    Attributes:
        entries: one :class:`LayoutEntry` per distinct parameter, in flat-vector order.
        dtype: the dtype of every parameter (and of the flat vector).

    Example:
        >>> import torch
        >>> from torchreparam import FlatLayout
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1))
        >>> layout = FlatLayout.from_module(net)
        >>> layout.numel, layout.names
        (11, ('0.weight', '0.bias', '2.weight', '2.bias'))
        >>> layout["2.weight"].slice
        slice(8, 10, None)
        >>> flat = layout.flatten(dict(net.named_parameters()))
        >>> torch.equal(layout.unflatten(flat)["0.weight"], net[0].weight)
        True
    """

    entries: tuple[LayoutEntry, ...]
    dtype: torch.dtype
    _index: dict[str, LayoutEntry] = field(init=False, repr=False, compare=False, hash=False)
    _positions: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        index: dict[str, LayoutEntry] = {}
        positions: dict[str, int] = {}
        offset = 0
        for position, entry in enumerate(self.entries):
            if entry.offset != offset:
                raise ValueError(
                    f"layout entry {entry.name!r} starts at offset {entry.offset} but the "
                    f"entries before it end at {offset}; entries must be contiguous and in order"
                )
            for name in (entry.name, *entry.aliases):
                if name in index:
                    raise ValueError(f"layout names must be unique; {name!r} appears twice")
                index[name] = entry
                positions[name] = position
            offset += entry.numel
        object.__setattr__(self, "_index", index)
        object.__setattr__(self, "_positions", positions)

    def __getstate__(self) -> dict[str, object]:
        return {"entries": self.entries, "dtype": self.dtype}

    def __setstate__(self, state: dict[str, object]) -> None:
        object.__setattr__(self, "entries", state["entries"])
        object.__setattr__(self, "dtype", state["dtype"])
        self.__post_init__()

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, *, include: Include = None) -> FlatLayout:
        """The layout of ``module``'s parameters, in ``module.parameters()`` order.

        Args:
            module: any ``nn.Module`` with initialized parameters.
            include: which parameters go into the flat vector: ``None`` or ``"all"`` (every
                parameter), ``"trainable"`` (those with ``requires_grad=True``), or a predicate
                ``include(name, parameter) -> bool``.

        Raises:
            TypeError: ``module`` is not an ``nn.Module`` or ``include`` is of the wrong type.
            ValueError: the selected parameters are uninitialized (lazy) or differ in dtype.
        """
        selected = select_parameters(module, include)
        return cls.from_named_tensors(selected, aliases=aliases_of(module, selected))

    @classmethod
    def from_named_tensors(
        cls,
        tensors: Mapping[str, torch.Tensor],
        *,
        aliases: Mapping[str, tuple[str, ...]] | None = None,
    ) -> FlatLayout:
        """The layout that packs ``tensors`` (name -> tensor, in order) back to back."""
        common = one_of(tensors, "dtype", "share one dtype", "convert the module with .to(dtype)")
        dtype: torch.dtype = common if common is not None else torch.get_default_dtype()
        entries, offset = [], 0
        for name, tensor in tensors.items():
            extra = tuple((aliases or {}).get(name, ()))
            entries.append(LayoutEntry(name, tuple(tensor.shape), offset, extra))
            offset += tensor.numel()
        return cls(tuple(entries), dtype)

    # ---- queries ------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        """Total number of elements of the flat vector."""
        last = self.entries[-1] if self.entries else None
        return 0 if last is None else last.offset + last.numel

    @property
    def names(self) -> tuple[str, ...]:
        """Entry names in flat-vector order (first occurrences; aliases excluded)."""
        return tuple(e.name for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[LayoutEntry]:
        return iter(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __getitem__(self, name: str) -> LayoutEntry:
        """The entry for ``name`` (an entry's name or one of its aliases)."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(
                f"{name!r} is not in this layout; its names are {list(self.names)}"
            ) from None

    def position(self, name: str) -> int:
        """Where ``name``'s entry (an entry's name or one of its aliases) is in :attr:`entries`:
        the index of its view in :meth:`unflatten`'s order."""
        if name not in self._positions:
            return self.entries.index(self[name])  # (self[name] raises the KeyError)
        return self._positions[name]

    # ---- conversions --------------------------------------------------------------------
    def unflatten(self, flat: torch.Tensor, *, aliases: bool = False) -> dict[str, torch.Tensor]:
        """Views of ``flat`` shaped like the parameters, by name (no copy).

        Args:
            flat: shape ``(num_params,)`` or ``(*batch, num_params)``; each view is then
                ``(*batch, *shape)`` (for example per-example gradients or a population).
            aliases: also list tied parameters under each of their other names.

        Returns:
            ``{name: view}`` in flat-vector order.

        Raises:
            TypeError: ``flat`` is not a tensor.
            ValueError: ``flat``'s last dimension is not ``num_params``.
        """
        self._check_flat(flat, "flat")
        batch = tuple(flat.shape[:-1])
        out: dict[str, torch.Tensor] = {}
        for entry in self.entries:
            view = flat[..., entry.slice].view((*batch, *entry.shape))
            out[entry.name] = view
            if aliases:
                out.update(dict.fromkeys(entry.aliases, view))
        return out

    def view(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        """The view of ``flat`` that holds parameter ``name``, shaped ``(*batch, *shape)``."""
        self._check_flat(flat, "flat")
        entry = self[name]
        return flat[..., entry.slice].view((*flat.shape[:-1], *entry.shape))

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate ``tensors`` (name -> tensor) into one flat vector, in layout order.

        Tied parameters may be given under any one of their names. Every entry must be present
        with its exact shape; extra names are refused.

        Returns:
            a new tensor of shape ``(num_params,)``.

        Raises:
            ValueError: names are missing or unexpected, or shapes differ (all listed at once).
        """
        problems, parts = [], []
        known = set(self._index)
        unexpected = sorted(set(tensors) - known)
        for entry in self.entries:
            given = [n for n in (entry.name, *entry.aliases) if n in tensors]
            if not given:
                problems.append(f"missing {entry.name!r}")
                continue
            tensor = tensors[given[0]]
            if tuple(tensor.shape) != entry.shape:
                problems.append(
                    f"{given[0]!r} has shape {tuple(tensor.shape)}, expected {entry.shape}"
                )
                continue
            parts.append(tensor.reshape(-1))
        problems += [f"unexpected {name!r}" for name in unexpected]
        if problems:
            raise ValueError("tensors do not match the layout: " + "; ".join(problems))
        if not parts:
            return torch.empty(0, dtype=self.dtype)
        return torch.cat(parts)

    def expand(
        self, values: Mapping[str, float | torch.Tensor] | Sequence[float] | torch.Tensor
    ) -> torch.Tensor:
        """One value per parameter (or per module), repeated over its elements: ``(num_params,)``.

        For per-layer hyperparameters (MAML++'s learned learning rates): differentiable w.r.t.
        ``values`` when they are tensors that require grad.

        Args:
            values: a sequence or tensor ``(len(layout),)`` with one value per entry, in order;
                or a mapping from entry names or module prefixes (``"encoder.0"`` covers every
                entry under it; ``""`` covers all) to values. Every entry must be covered; the
                longest matching key wins.

        Raises:
            ValueError: entries left uncovered, keys that match nothing, or a wrong length.

        Example:
            >>> import torch
            >>> from torchreparam import FlatLayout
            >>> layout = FlatLayout.from_module(torch.nn.Sequential(torch.nn.Linear(2, 1)))
            >>> layout.expand({"0.weight": 0.1, "0": 1.0})
            tensor([0.1000, 0.1000, 1.0000])
        """
        if isinstance(values, Mapping):
            values = self._by_key(values)
        tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(values)
        if tensor.shape != (len(self),):
            raise ValueError(
                f"values must have one entry per layout entry ({len(self)}), got shape "
                f"{tuple(tensor.shape)}"
            )
        sizes = torch.tensor([e.numel for e in self.entries], device=tensor.device)
        return torch.repeat_interleave(tensor, sizes, output_size=self.numel)

    def _by_key(self, values: Mapping[str, float | torch.Tensor]) -> torch.Tensor:
        chosen, used, missing = [], set(), []
        for entry in self.entries:
            keys = [k for k in values if entry.name == k or entry.name.startswith(k + ".") or not k]
            if not keys:
                missing.append(entry.name)
                continue
            key = max(keys, key=len)
            used.add(key)
            chosen.append(torch.as_tensor(values[key]))
        unused = sorted(set(values) - used)
        if missing or unused:
            problems = [f"no value for {missing}"] if missing else []
            problems += [f"keys that match no entry: {unused}"] if unused else []
            raise ValueError("values do not cover the layout: " + "; ".join(problems))
        return torch.stack(chosen) if chosen else torch.zeros(0)

    def _check_flat(self, flat: object, argname: str) -> None:
        if not isinstance(flat, torch.Tensor):
            raise TypeError(
                f"{argname} must be a torch.Tensor of shape (..., {self.numel}), "
                f"got {type(flat).__name__}"
            )
        if flat.dim() == 0 or flat.shape[-1] != self.numel:
            raise ValueError(
                f"{argname} has shape {tuple(flat.shape)} but this layout needs "
                f"{self.numel} elements in its last dimension (shape (..., {self.numel}))"
            )


# ---- selecting parameters ---------------------------------------------------------------
def select_parameters(module: nn.Module, include: Include) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of the distinct parameters that ``include`` selects, in order."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    named = dict(module.named_parameters())
    lazy = sorted(n for n, p in named.items() if nn.parameter.is_lazy(p))
    if lazy:
        raise ValueError(
            f"module has uninitialized lazy parameters ({', '.join(lazy)}); run one forward "
            "pass with an example input before wrapping, so that their shapes are known"
        )
    if include is None or include == "all":
        return named
    if include == "trainable":
        return {n: p for n, p in named.items() if p.requires_grad}
    if callable(include):
        return {n: p for n, p in named.items() if include(n, p)}
    raise TypeError(
        "include must be None, 'all', 'trainable' or a callable (name, parameter) -> bool, "
        f"got {include!r}"
    )


def aliases_of(
    module: nn.Module, selected: Mapping[str, nn.Parameter]
) -> dict[str, tuple[str, ...]]:
    """For each selected parameter, the other names it is registered under."""
    first = {id(p): n for n, p in selected.items()}
    out: dict[str, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        owner = first.get(id(param))
        if owner is not None and owner != name:
            out.setdefault(owner, []).append(name)
    return {n: tuple(a) for n, a in out.items()}
