"""One member of a population as a plain module, and back.

A member is one row of a ``(population, num_params)`` matrix (and, with per-member buffers, the
same row of each ``(population, *shape)`` buffer). :func:`member_module` checks it out as an
ordinary ``nn.Module`` that knows nothing of torchreparam (the classes the model had before it
was wrapped, real parameters holding copies of the member's weights), to save with plain
``torch.save``, hand to other code, or fine-tune on its own; :func:`member_vector` gives the
flat vector of such a module, to write it back into the population.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_buffers, check_flat_param
from ._guards import plain_copy
from ._module import ReparamModule
from ._types import Buffers

__all__ = ["member_module", "member_vector"]


def member_module(r: ReparamModule, flat_param: Tensor, *, buffers: Buffers = None) -> nn.Module:
    """A plain copy of ``r``'s model holding the weights ``flat_param`` (one member).

    The copy has the model's own classes (as before wrapping), its own parameters (copies: no
    storage shared with ``flat_param`` or the population) and copies of the buffers; nothing in
    it refers to torchreparam, so ``torch.save``/``torch.load`` and ``load_state_dict`` treat it
    as any module. Parameters outside ``flat_param`` (frozen ones with ``include="trainable"``)
    are copies of the model's own.

    Args:
        r: the wrapper.
        flat_param: ``(num_params,)``: one member, ``thetas[i]``.
        buffers: the member's buffers, as for a call (a sequence in ``module.buffers()`` order
            or a dict ``{name: tensor}`` for some; ``[b[i] for b in population_buffers]`` for
            per-member ones); ``None``: the model's own.

    Returns:
        the plain module, in the mode (train/eval) of ``r.module``, with parameters requiring
        grad as ``r.flat_param`` does.

    Raises:
        TypeError, ValueError: ``flat_param`` or ``buffers`` do not fit ``r``'s layout.

    Example:
        >>> import torch
        >>> from torchreparam import ReparamModule, member_module
        >>> r = ReparamModule(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh()))
        >>> thetas = r.fresh_flat_param(4)  # (4, 8): a population
        >>> plain = member_module(r, thetas[2])
        >>> type(plain) is torch.nn.Sequential, torch.equal(plain[0].bias, thetas[2, 6:])
        (True, True)
    """
    if not isinstance(r, ReparamModule):
        raise TypeError(f"r must be a ReparamModule, got {type(r).__name__}")
    core = r._core
    layout = core.layout
    if not isinstance(flat_param, Tensor) or flat_param.dim() != 1:
        found = (
            f"shape {tuple(flat_param.shape)}"
            if isinstance(flat_param, Tensor)
            else type(flat_param).__name__
        )
        raise ValueError(
            f"flat_param must be one member's vector of shape ({layout.numel},), got {found}; "
            "for a population, pass one row: thetas[i]"
        )
    check_flat_param(flat_param, layout.numel, core.flat())
    own = core.own_buffers()
    given = own if buffers is None else check_buffers(buffers, core.buffer_names, own)
    with torch.no_grad():
        plain = plain_copy(r.module, {})
        _keep_empty_parameters(r.module, plain)
        for name, view in layout.unflatten(flat_param.detach()).items():
            plain.get_parameter(name).copy_(view)
        for name, value in zip(core.buffer_names, given, strict=True):
            _set_buffer(plain, name, value.detach().clone())
    return plain


def _keep_empty_parameters(wrapped: nn.Module, plain: nn.Module) -> None:
    """Parameters registered as ``None`` (``Linear(bias=False)``'s bias) are kept, in order
    (``plain_copy`` leaves them out, and ``forward`` reads ``self.bias``)."""
    for sub, clone in zip(wrapped.modules(), plain.modules(), strict=True):
        mine, theirs = sub.__dict__["_parameters"], clone._parameters
        if any(name not in theirs for name in mine):
            clone._parameters = {name: theirs.get(name, mine[name]) for name in mine} | theirs


def _set_buffer(module: nn.Module, name: str, value: Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    sub = module.get_submodule(owner)
    sub._buffers[leaf] = value  # (a copy of its own: never the member's storage)


def member_vector(r: ReparamModule, module: nn.Module) -> Tensor:
    """The flat vector of ``module``'s parameters in ``r``'s layout (a new tensor).

    The inverse of :func:`member_module`: write a member back into a population with
    ``thetas[i] = member_vector(r, plain)`` (under ``torch.no_grad()`` for a parameter), and its
    buffers with ``b[i] = plain.get_buffer(name)``.

    Args:
        r: the wrapper.
        module: a module with ``r``'s parameter names and shapes (as :func:`member_module`
            returns; parameters outside ``r.flat_param`` are ignored).

    Returns:
        ``(num_params,)``, detached, of ``r.flat_param``'s dtype.

    Raises:
        ValueError: ``module`` lacks some of the layout's parameters, or their shapes differ
            (all listed).
    """
    if not isinstance(r, ReparamModule):
        raise TypeError(f"r must be a ReparamModule, got {type(r).__name__}")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    layout = r._core.layout
    named = module.named_parameters(remove_duplicate=False)
    tensors = {name: p.detach() for name, p in named if name in layout}
    return layout.flatten(tensors).to(layout.dtype)
