"""Gradient checkpointing inside a call with another flat vector: recompute with that vector.

``torch.utils.checkpoint`` runs the checkpointed function again during backward, after the
call that bound ``flat_param`` has returned; the module would then read its own weights and
the gradient w.r.t. the vector would be silently wrong (``torch.func.functional_call`` has the
same flaw). When a getter of a binding that needs gradients runs inside a checkpointed region,
this module makes the recomputation re-enter the bindings active at forward time:

- ``use_reentrant=False``: the region's ``_CheckpointFrame`` (found through the saved-tensor
  hooks checkpoint installs) gets a ``recompute_fn`` that re-enters the bindings;
- ``use_reentrant=True``: the forward runs under ``no_grad`` inside ``CheckpointFunction``; its
  ``ctx.run_function`` gets the same wrapper.

If torch's internals ever stop looking like this, the call is refused loudly: never a wrong
gradient.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

import torch

__all__ = ["guard_recomputation"]

_top_hooks = torch._C._autograd._top_saved_tensors_default_hooks
_MARK = "_torchreparam_chain"
_REFUSAL = (
    "torch.utils.checkpoint runs inside a call with flat_param=..., and torchreparam could not "
    "make its recomputation use that vector ({why}); refusing rather than computing wrong "
    "gradients. Call without flat_param, or without checkpointing"
)

Runner = Callable[[Any, Callable[..., Any], tuple[Any, ...]], Any]


def guard_recomputation(chain: Any, run_in: Runner, stop: CodeType) -> None:
    """If a checkpointed region is being recorded now, make its recomputation run in ``chain``.

    ``run_in(chain, fn, args)`` calls ``fn(*args)`` with the bindings ``chain`` active; ``stop``
    is the code of the frame that made the binding (the stack is searched no further).
    """
    hooks = _top_hooks(True)
    if hooks is not None:
        _rebind_frame(hooks[0], chain, run_in)
    if not torch.is_grad_enabled():  # perhaps inside CheckpointFunction.forward (reentrant)
        _rebind_reentrant(sys._getframe(2), chain, run_in, stop)


def _rebind_frame(pack_hook: Any, chain: Any, run_in: Runner) -> None:
    if not getattr(pack_hook, "__qualname__", "").startswith("_checkpoint_hook."):
        return  # other saved-tensor hooks (offloading, for example): nothing is recomputed
    cells = getattr(pack_hook, "__closure__", None) or ()
    frames = [
        c.cell_contents for c in cells if type(c.cell_contents).__name__ == "_CheckpointFrame"
    ]
    if len(frames) != 1 or not callable(getattr(frames[0], "recompute_fn", None)):
        raise RuntimeError(_REFUSAL.format(why="no checkpoint frame with a recompute_fn"))
    _wrap(frames[0], "recompute_fn", chain, run_in)


def _rebind_reentrant(frame: FrameType | None, chain: Any, run_in: Runner, stop: CodeType) -> None:
    module = sys.modules.get("torch.utils.checkpoint")
    function = getattr(module, "CheckpointFunction", None)
    if function is None:
        return  # never imported: no reentrant checkpoint can be running
    target = function.forward.__code__
    for _ in range(64):  # from the getter up to the call that made the binding
        if frame is None or frame.f_code is stop:
            return
        if frame.f_code is target:
            ctx = frame.f_locals.get("ctx")
            if ctx is None or not callable(getattr(ctx, "run_function", None)):
                raise RuntimeError(_REFUSAL.format(why="CheckpointFunction has no run_function"))
            _wrap(ctx, "run_function", chain, run_in)
            return
        frame = frame.f_back


def _wrap(owner: Any, attribute: str, chain: Any, run_in: Runner) -> None:
    if getattr(owner, _MARK, None) is chain:
        return
    original = getattr(owner, attribute)

    def rerun(*args: Any) -> Any:
        return run_in(chain, original, args)

    setattr(owner, attribute, rerun)
    setattr(owner, _MARK, chain)
