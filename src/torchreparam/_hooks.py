"""torch's global module hooks, read in one place.

``torch.nn.modules.module.register_module_forward_hook`` and its kin fill private dicts of
that module in place; every module call runs what they hold. The fast call path of the wrapper
and the batched population plan both need to know whether any is registered (then they take
``nn.Module``'s own path). No torchreparam imports: every layer may use it.
"""

from __future__ import annotations

from torch.nn.modules.module import (  # dicts that register_module_*_hook fill in place
    _global_backward_hooks,
    _global_backward_pre_hooks,
    _global_forward_hooks,
    _global_forward_pre_hooks,
)

__all__ = ["global_hooks"]


def global_hooks() -> bool:
    """Whether any global module hook (forward, forward pre, backward, backward pre) is set."""
    return bool(
        _global_forward_pre_hooks
        or _global_forward_hooks
        or _global_backward_pre_hooks
        or _global_backward_hooks
    )
