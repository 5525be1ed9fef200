"""Input checks: every problem found before anything is touched, reported once, clearly."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["check_flat_param", "check_buffers", "StateDictMismatchError"]


class StateDictMismatchError(ValueError, RuntimeError):
    """A state dict does not fit the module (keys, shapes); nothing was loaded.

    A ``ValueError`` (the input is wrong) that is also a ``RuntimeError``, which is what
    ``torch.nn.Module.load_state_dict`` raises, so existing ``except`` clauses keep working.
    """


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}, dtype {value.dtype}, on {value.device}"
    return f"a {type(value).__name__}"


def check_flat_param(theta: object, numel: int, ref: Tensor, argname: str = "flat_param") -> None:
    """Raise unless ``theta`` can stand in for ``ref`` (the module's flat parameter).

    ``theta`` may be ``(numel,)`` or a population ``(population, numel)``.
    """
    if not isinstance(theta, Tensor):
        raise TypeError(
            f"{argname} must be a torch.Tensor of shape ({numel},) or (population, {numel}), "
            f"got {_describe(theta)}"
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
    buffers: object, names: Sequence[str], own: Sequence[Tensor], argname: str = "buffers"
) -> list[Tensor]:
    """Validate ``buffers`` against the module's own and return the full list to bind.

    ``buffers`` is a sequence in ``module.buffers()`` order (all of them) or a mapping from
    buffer names (as in ``module.named_buffers()``) to tensors (a subset; the rest are the
    module's own).
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
        f"{name}: expected shape {tuple(mine.shape)}, dtype {mine.dtype} on {mine.device}, "
        f"got {_describe(b)}"
        for name, b, mine in zip(names, given, own, strict=True)
        if b.shape != mine.shape or b.dtype != mine.dtype or b.device != mine.device
    ]
    if problems:
        raise ValueError(f"{argname} do not match the module's buffers: " + "; ".join(problems))
    return given


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


def same_device(tensors: Mapping[str, Tensor]) -> torch.device | None:
    """The one device all ``tensors`` are on; raise if they are on several."""
    devices = sorted({str(t.device) for t in tensors.values()})
    if len(devices) > 1:
        listing = ", ".join(f"{n}: {t.device}" for n, t in tensors.items())
        raise ValueError(
            f"parameters must be on one device to live in one flat vector, got {devices} "
            f"({listing}); move the module with .to(device) or choose a subset with include="
        )
    return next(iter(tensors.values())).device if tensors else None
