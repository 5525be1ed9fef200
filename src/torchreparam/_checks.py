"""Input checks: every problem found before anything is touched, reported once, clearly."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "StateDictMismatchError",
    "check_buffers",
    "check_flat_param",
    "check_in_dims",
    "is_dtensor",
]


class StateDictMismatchError(ValueError, RuntimeError):
    """A state dict does not fit the module (keys, shapes); nothing was loaded.

    A ``ValueError`` (the input is wrong) that is also a ``RuntimeError``, which is what
    ``torch.nn.Module.load_state_dict`` raises, so existing ``except`` clauses keep working.
    """


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}, dtype {value.dtype}, on {value.device}"
    return f"a {type(value).__name__}"


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a ``torch.distributed`` DTensor (such as the ``flat_param`` that FSDP's
    ``fully_shard`` shards). Free when DTensor was never imported: then none can exist."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and isinstance(value, dtensor)


def check_flat_param(theta: object, numel: int, ref: Tensor, argname: str = "flat_param") -> None:
    """Raise unless ``theta`` can stand in for ``ref`` (the module's flat parameter).

    ``theta`` may be ``(numel,)`` or a population ``(population, numel)``.
    """
    if not isinstance(theta, Tensor):
        raise TypeError(
            f"{argname} must be a torch.Tensor of shape ({numel},) or (population, {numel}), "
            f"got {_describe(theta)}"
        )
    if is_dtensor(theta):
        raise TypeError(
            f"{argname} is a DTensor (placements {getattr(theta, 'placements', ())}), spread "
            "across ranks like the flat_param that FSDP's fully_shard shards: pass a plain "
            f"tensor, for example {argname}.full_tensor() (a collective: call it on every rank), "
            "or call the wrapper without flat_param= to use its own (FSDP gathers it for the call)"
        )
    if theta.dim() not in (1, 2) or theta.shape[-1] != numel or 0 in theta.shape[:-1]:
        raise ValueError(
            f"{argname} has shape {tuple(theta.shape)} but this module's layout needs {numel} "
            f"elements: pass shape ({numel},) or (population, {numel}) with population >= 1"
        )
    if theta.dtype != ref.dtype:
        raise TypeError(
            f"{argname} has dtype {theta.dtype} but the module's parameters are {ref.dtype}; "
            f"convert it with {argname}.to({ref.dtype}) or convert the module with "
            f".to({theta.dtype})"
        )
    if theta.device != ref.device:
        raise ValueError(
            f"{argname} is on {theta.device} but the module's parameters are on {ref.device}; "
            f"move it with {argname}.to({str(ref.device)!r}) or move the module"
        )


def check_buffers(
    buffers: object,
    names: Sequence[str],
    own: Sequence[Tensor],
    argname: str = "buffers",
    *,
    population: int | None = None,
) -> list[Tensor]:
    """Validate ``buffers`` against the module's own and return the full list to bind.

    ``buffers`` is a sequence in ``module.buffers()`` order (all of them) or a mapping from
    buffer names (as in ``module.named_buffers()``) to tensors (a subset; the rest are the
    module's own). For a population call, each may also be ``(population, *shape)``.
    """
    if isinstance(buffers, Mapping):
        unknown = sorted(set(buffers) - set(names))
        if unknown:
            raise ValueError(
                f"{argname} has unknown names {unknown}; this module's buffers are {list(names)}"
            )
        given = [buffers.get(name, mine) for name, mine in zip(names, own, strict=True)]
    elif isinstance(buffers, Sequence) and not isinstance(buffers, str):
        if len(buffers) != len(names):
            raise ValueError(
                f"{argname} has {len(buffers)} entries but this module has {len(names)} buffers "
                f"({', '.join(names) or 'none'}); pass them all in module.buffers() order, or a "
                "dict {name: tensor} for a subset"
            )
        given = list(buffers)
    else:
        raise TypeError(
            f"{argname} must be a tuple/list in module.buffers() order or a dict by name, "
            f"got {_describe(buffers)}"
        )
    wrong_type = [
        f"{name}: expected a tensor, got {_describe(b)}"
        for name, b in zip(names, given, strict=True)
        if not isinstance(b, Tensor)
    ]
    if wrong_type:
        raise TypeError(f"{argname} has entries that are not tensors: " + "; ".join(wrong_type))
    problems = [
        f"{name}: expected shape {_allowed(mine, population)}, dtype {mine.dtype} on "
        f"{mine.device}, got {_describe(b)}"
        for name, b, mine in zip(names, given, own, strict=True)
        if not _fits(b, mine, population) or b.dtype != mine.dtype or b.device != mine.device
    ]
    if problems:
        raise ValueError(f"{argname} do not match the module's buffers: " + "; ".join(problems))
    return given


def _fits(given: Tensor, mine: Tensor, population: int | None) -> bool:
    if given.shape == mine.shape:
        return True
    return population is not None and given.shape == (population, *mine.shape)


def _allowed(mine: Tensor, population: int | None) -> str:
    shape = tuple(mine.shape)
    return str(shape) if population is None else f"{shape} or {(population, *shape)}"


def check_in_dims(
    in_dims: object, args: Sequence[object], population: int
) -> tuple[int | None, ...]:
    """``in_dims`` as one ``0``/``None`` per positional input, after checking the inputs."""
    if in_dims is None or in_dims == 0:
        dims: tuple[object, ...] = (in_dims,) * len(args)
    elif isinstance(in_dims, tuple) and len(in_dims) == len(args):
        dims = in_dims
    else:
        raise ValueError(
            f"in_dims must be None, 0, or a tuple of 0/None with one entry per positional input "
            f"({len(args)} here), got {in_dims!r}"
        )
    for i, (dim, arg) in enumerate(zip(dims, args, strict=True)):
        if dim is None:
            continue
        if dim != 0:
            raise ValueError(f"in_dims[{i}] must be 0 or None, got {dim!r}")
        if not isinstance(arg, Tensor) or arg.dim() == 0 or arg.shape[0] != population:
            raise ValueError(
                f"in_dims[{i}] is 0 but input {i} is {_describe(arg)}: its leading dimension "
                f"must be the population size {population}"
            )
    return dims  # type: ignore[return-value]


def describe_state_dict_problems(
    missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str]
) -> str:
    """One message listing every problem, sorted, as torch's ``load_state_dict`` does."""
    parts = []
    if missing:
        parts.append("Missing key(s): " + ", ".join(repr(k) for k in sorted(missing)))
    if unexpected:
        parts.append("Unexpected key(s): " + ", ".join(repr(k) for k in sorted(unexpected)))
    parts += sorted(mismatched)
    return "; ".join(parts)


def one_of(tensors: Mapping[str, Tensor], attribute: str, must: str, fix: str) -> Any:
    """The one value of ``attribute`` (``"dtype"``, ``"device"``) all ``tensors`` share, or
    ``None`` when there are none; raise, listing each tensor's, if they differ."""
    values = sorted({str(getattr(t, attribute)) for t in tensors.values()})
    if len(values) > 1:
        listing = ", ".join(f"{n}: {getattr(t, attribute)}" for n, t in tensors.items())
        raise ValueError(
            f"parameters must {must} to live in one flat vector, got {values} ({listing}); "
            f"{fix} or choose a subset with include="
        )
    return getattr(next(iter(tensors.values())), attribute) if tensors else None


def same_device(tensors: Mapping[str, Tensor]) -> torch.device | None:
    """The one device all ``tensors`` are on; raise if they are on several."""
    device: torch.device | None = one_of(
        tensors, "device", "be on one device", "move the module with .to(device)"
    )
    return device
