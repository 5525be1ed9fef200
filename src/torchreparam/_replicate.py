"""``nn.DataParallel``: replicas that read their own copy of the vector and buffers.

``torch.nn.parallel.replicate`` makes each replica a shallow copy of every module
(``_replicate_for_data_parallel``) and then sets the broadcast copies of the parameters and
buffers on the copies. The copies of a wrapped tree would still share the original's core (the
submodules find it in their ``__dict__``), so they would read the original ``flat_param`` and
buffers, on the first device. A replica of the wrapper therefore gets a core of its own on its
first call: its broadcast ``flat_param``, the buffers of its own module copies. Nothing of the
original changes.

``nn.DataParallel`` also splits every tensor argument along its first dimension, so code
written for the original torchreparam passes ``flat_param=theta.expand(num_gpus, N)`` and each
replica receives one ``(1, N)`` row: under ``DataParallel`` (a replica, or the wrapper itself
when ``DataParallel`` runs on one device), such a row is read as the one vector it stands for.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn

from ._checks import check_buffers, check_flat_param
from ._inject import CORE_KEY, Core, buffer_site
from ._types import Buffers, InDims, Output

__all__ = ["called_by_data_parallel", "one_vector", "replica_of"]

_HOLDER = "_torchreparam_replica_holder"  # in a replica's __dict__ once it has its own core
_CLASSES: dict[type, type] = {}  # wrapper class -> its replica class
_DP_FORWARD = nn.DataParallel.forward.__code__


def replica_of(wrapper: nn.Module) -> nn.Module:
    """What ``nn.Module._replicate_for_data_parallel`` makes, of a class that takes its own
    core on its first call (see the module docstring)."""
    replica = nn.Module._replicate_for_data_parallel(wrapper)
    cls = type(wrapper)
    made = _CLASSES.get(cls)
    if made is None:
        namespace = {
            "forward": _replica_forward,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        }
        made = _CLASSES[cls] = type(cls.__name__, (cls,), namespace)
    replica.__class__ = made
    replica.__dict__["_traced"] = None  # traced graphs read the original's core
    return replica


def _replica_forward(
    self: nn.Module,
    *inputs: object,
    flat_param: Tensor | None = None,
    buffers: Buffers = None,
    in_dims: InDims = None,
    **kwargs: object,
) -> Output:
    """The wrapper's ``forward``, on this replica's own core; a ``(1, N)`` row is one vector."""
    if _HOLDER not in self.__dict__:
        _adopt(self)
    if in_dims is None and isinstance(flat_param, Tensor) and flat_param.dim() == 2:
        core: Core = self.__dict__["_core"]
        check_flat_param(flat_param, core.layout.numel, core.flat())
        if flat_param.shape[0] != 1:
            raise ValueError(
                f"flat_param reached an nn.DataParallel replica with shape "
                f"{tuple(flat_param.shape)}: DataParallel splits every tensor argument along its "
                "first dimension, the inputs too, so each of these members would see only this "
                "replica's part of the batch. Pass flat_param=theta.expand(num_gpus, -1) for one "
                "vector (each replica reads its (1, N) row as that vector), in_dims=0 with "
                "per-member inputs to spread a population over the GPUs, or call the wrapper "
                "without DataParallel"
            )
        flat_param, buffers = one_vector(core, flat_param, buffers)
    wrapper: Any = super(type(self), self)  # (the wrapper's class, a subclass's forward too)
    return wrapper.forward(
        *inputs, flat_param=flat_param, buffers=buffers, in_dims=in_dims, **kwargs
    )


def _adopt(replica: nn.Module) -> None:
    """Give ``replica`` (and its copies of the wrapped tree) a core of its own."""
    old: Core = replica.__dict__["_core"]
    # Set by replicate(): the broadcast copy (a plain tensor), or under no_grad on the first
    # device the original Parameter itself, which nn.Module files under _parameters.
    flat = replica.__dict__.get("flat_param", replica._parameters.get("flat_param"))
    if not isinstance(flat, Tensor):
        raise RuntimeError(
            "this copy of a ReparamModule was made by _replicate_for_data_parallel but has no "
            "flat_param of its own: only torch.nn.parallel.replicate (nn.DataParallel) may "
            "make such copies"
        )
    if isinstance(flat, nn.Parameter):  # a plain view: a replica's weights are not leaves
        flat = flat.view_as(flat)
    holder = nn.Module()  # holds the copy in _parameters, as the wrapper holds flat_param
    holder._parameters["flat_param"] = flat  # type: ignore[assignment]  # (not a leaf)
    root: nn.Module = replica._modules["module"]  # type: ignore[assignment]
    sites = {name: buffer_site(root, name) for name in old.buffer_names}
    core = Core(old.layout, holder, sites)
    core.writes = old.writes
    for module in root.modules():  # the replica's copies: their __dict__ are their own
        if module.__dict__.get(CORE_KEY) is old:
            module.__dict__[CORE_KEY] = core
    replica.__dict__["_core"] = core
    replica.__dict__[_HOLDER] = holder  # (the core keeps only a weak reference to it)


def one_vector(core: Core, flat_param: Tensor, buffers: Buffers) -> tuple[Tensor, Buffers]:
    """A ``(1, N)`` row as the vector ``(N,)``, and ``(1, *shape)`` buffers as ``shape``."""
    if buffers is not None:
        own = core.own_buffers()
        bound = check_buffers(buffers, core.buffer_names, own, population=1)
        buffers = [  # b[0]: a view, so in-place updates land in the tensor given
            b[0] if b.dim() == mine.dim() + 1 else b for b, mine in zip(bound, own, strict=True)
        ]
    return flat_param[0], buffers


def called_by_data_parallel(wrapper: nn.Module) -> bool:
    """Whether ``nn.DataParallel.forward``, running on one device, called ``wrapper`` itself
    (then it makes no replica; a ``(1, N)`` argument is the row it split off for that device).

    Looks a few frames up the stack: only for a ``(1, N)`` population without ``in_dims``."""
    frame = sys._getframe(1)
    for _ in range(12):  # our frames, nn.Module's call path (hooks), a subclass's forward
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            return False
        if frame.f_code is _DP_FORWARD:
            dp = frame.f_locals.get("self")
            return (
                isinstance(dp, nn.DataParallel)
                and dp._modules.get("module") is wrapper
                and len(dp.device_ids) == 1
            )
    return False
