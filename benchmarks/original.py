"""A faithful minimal re-implementation of the original torchreparam's ``ReparamModule``.

The original (SsnL/PyTorch-Reparam-Module) copies every parameter into ``flat_param`` with
``torch.cat``, deletes the parameters from their modules, and on every call splits the vector
with ``split`` + ``.view``, sets the views on the modules as plain attributes through
``nn.Module.__setattr__``, calls the module, and sets the previous views back (not in a
``finally``: a call that raises leaves the alternate weights in place, as in the original).
It is kept here only as a peer for the benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["OriginalReparamModule"]


class OriginalReparamModule(nn.Module):
    """The original ``ReparamModule``: ``flat_param`` by ``torch.cat``; views set per call."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        infos: list[tuple[str, str]] = []
        shared: list[tuple[str, str, str, str]] = []
        memo: dict[nn.Parameter, tuple[str, str]] = {}
        params: list[Tensor] = []
        for mn, m in self.named_modules():
            for n, p in m.named_parameters(recurse=False):
                if p in memo:
                    shared.append((mn, n, *memo[p]))
                else:
                    memo[p] = (mn, n)
                    infos.append((mn, n))
                    params.append(p.detach())
        self._param_infos = tuple(infos)
        self._shared_param_infos = tuple(shared)
        self._param_numels = tuple(p.numel() for p in params)
        self._param_shapes = tuple(p.size() for p in params)
        self.flat_param = nn.Parameter(torch.cat([p.reshape(-1) for p in params], 0))
        self.param_numel = self.flat_param.numel()
        del params, memo
        for mn, n in self._param_infos:
            delattr(self._get_module_from_name(mn), n)
        for mn, n, _, _ in self._shared_param_infos:
            delattr(self._get_module_from_name(mn), n)
        self._unflatten_param(self.flat_param)

    def _get_module_from_name(self, mn: str) -> nn.Module:
        m: nn.Module = self
        for part in mn.split(".") if mn else ():
            m = getattr(m, part)
        return m

    def _unflatten_param(self, flat_param: Tensor) -> None:
        views = (
            t.view(s)
            for t, s in zip(flat_param.split(self._param_numels), self._param_shapes, strict=True)
        )
        for (mn, n), p in zip(self._param_infos, views, strict=True):
            setattr(self._get_module_from_name(mn), n, p)  # a plain attribute
        self._set_shared()

    def _set_shared(self) -> None:
        for mn, n, smn, sn in self._shared_param_infos:
            source = getattr(self._get_module_from_name(smn), sn)
            setattr(self._get_module_from_name(mn), n, source)

    @contextmanager
    def unflattened_param(self, flat_param: Tensor) -> Iterator[None]:
        """Within the block the module uses views of ``flat_param`` (restored after, on success)."""
        saved = [getattr(self._get_module_from_name(mn), n) for mn, n in self._param_infos]
        self._unflatten_param(flat_param)
        yield
        for (mn, n), p in zip(self._param_infos, saved, strict=True):
            setattr(self._get_module_from_name(mn), n, p)
        self._set_shared()

    def forward(self, *inputs: Any, flat_param: Tensor | None = None, **kwinputs: Any) -> Any:
        """Call the module with ``flat_param`` (default: its own) set as its weights."""
        if flat_param is None:
            flat_param = self.flat_param
        with self.unflattened_param(flat_param):
            return self.module(*inputs, **kwinputs)
