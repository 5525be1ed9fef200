"""torchreparam: any ``nn.Module`` over one flat parameter vector, callable with any other.

Example:
    >>> import torch
    >>> from torchreparam import ReparamModule
    >>> r = ReparamModule(torch.nn.Linear(3, 2))
    >>> r.flat_param.shape
    torch.Size([8])
"""

from ._checks import StateDictMismatchError
from ._layout import FlatLayout, LayoutEntry
from ._module import ReparamModule

__all__ = ["FlatLayout", "LayoutEntry", "ReparamModule", "StateDictMismatchError"]
__version__ = "0.1.0"
