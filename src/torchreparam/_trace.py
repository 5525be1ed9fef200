"""TorchScript-traced calls: a graph per train/eval configuration; vector and buffers as inputs."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_buffers, check_flat_param
from ._inject import Core, call_bound, innermost

__all__ = ["Traced"]


class Traced:
    """Traced graphs of ``module`` taking ``(flat, *buffers, *inputs)``, keyed by train/eval modes.

    Taking the vector and the buffers as graph inputs (not constants) keeps the graphs valid
    after optimizer steps, ``load_state_dict`` and buffer updates; keying them by every
    submodule's ``training`` flag makes them follow ``.train()``/``.eval()``.
    """

    def __init__(self, core: Core, module: nn.Module, trace_kwargs: dict[str, Any]) -> None:
        self.core = core
        self.module = module
        self.trace_kwargs = trace_kwargs
        self.graphs: dict[tuple[bool, ...], Callable[..., Any]] = {}

    def accepts(self, flat_param: Tensor | None, inputs: tuple[Any, ...]) -> bool:
        """Whether a call can run traced: one vector (or none), tensor inputs, no binding."""
        if flat_param is not None and (not isinstance(flat_param, Tensor) or flat_param.dim() != 1):
            return False
        return all(isinstance(x, Tensor) for x in inputs) and innermost(self.core) is None

    def prepare(self, flat: Tensor, inputs: tuple[Any, ...]) -> None:
        """Trace for the current train/eval configuration now (errors surface at ``trace()``)."""
        self._graph(flat, self.core.own_buffers(), inputs)

    def __call__(self, flat_param: Tensor | None, buffers: Any, inputs: tuple[Any, ...]) -> Any:
        core = self.core
        flat = core.flat() if flat_param is None else flat_param
        if flat_param is not None:
            check_flat_param(flat_param, core.layout.numel, core.flat())
        own = core.own_buffers()
        bufs = own if buffers is None else check_buffers(buffers, core.buffer_names, own)
        return self._graph(flat, bufs, inputs)(flat, *bufs, *inputs)

    def _graph(
        self, flat: Tensor, bufs: list[Tensor], inputs: tuple[Any, ...]
    ) -> Callable[..., Any]:
        key = tuple(m.training for m in self.module.modules())
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._trace(flat, bufs, inputs)
        return graph

    def _trace(
        self, flat: Tensor, bufs: list[Tensor], inputs: tuple[Any, ...]
    ) -> Callable[..., Any]:
        core, module, count = self.core, self.module, len(bufs)

        def run(flat: Tensor, *rest: Any) -> Any:
            views = core.views.traceable(flat)
            return call_bound(core, views, list(rest[:count]), module, rest[count:], {})

        # Example buffers are copies: tracing in train mode must not update the real ones.
        examples = (flat, *(b.clone() for b in bufs), *inputs)
        with warnings.catch_warnings():
            # We use TorchScript tracing as the original did; torch.compile is the modern path.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.*deprecated")
            return torch.jit.trace(run, examples, **self.trace_kwargs)
