"""torchreparam: any ``nn.Module`` over one flat parameter vector, callable with any other.

Example:
    >>> import torch
    >>> from torchreparam import ReparamModule
    >>> r = ReparamModule(torch.nn.Linear(3, 2))
    >>> r.flat_param.shape
    torch.Size([8])
"""

from ._checks import StateDictMismatchError
from ._derivatives import gnvp, hessian, hvp, jacobian, per_example_grads
from ._inner import AdamState, SGDState, adam, sgd
from ._layout import FlatLayout, LayoutEntry
from ._module import ReparamModule

__all__ = [
    "AdamState",
    "FlatLayout",
    "LayoutEntry",
    "ReparamModule",
    "SGDState",
    "StateDictMismatchError",
    "adam",
    "gnvp",
    "hessian",
    "hvp",
    "jacobian",
    "per_example_grads",
    "sgd",
]
__version__ = "0.1.0"
