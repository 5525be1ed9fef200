"""torchreparam: any ``nn.Module`` over one flat parameter vector, callable with any other.

Example:
    >>> import torch
    >>> from torchreparam import ReparamModule
    >>> r = ReparamModule(torch.nn.Linear(3, 2))
    >>> r.flat_param.shape
    torch.Size([8])
"""

from ._checkpoint import (
    FlatCheckpoint,
    from_state_dict,
    load_checkpoint,
    load_flat,
    save_checkpoint,
    save_flat,
    to_module_state_dict,
    to_wrapper_state_dict,
)
from ._checks import StateDictMismatchError
from ._derivatives import gnvp, hessian, hvp, jacobian, per_example_grads
from ._distributed import evaluate_population
from ._explain import explain_population
from ._files import layout_from_json, layout_to_json
from ._inner import AdamState, SGDState, adam, sgd
from ._layout import FlatLayout, LayoutEntry
from ._members import member_module, member_vector
from ._module import ReparamModule
from ._trajectory import Trajectory, load_trajectory, save_trajectory
from ._unroll import Unrolled, unroll

__all__ = [
    "AdamState",
    "FlatCheckpoint",
    "FlatLayout",
    "LayoutEntry",
    "ReparamModule",
    "SGDState",
    "StateDictMismatchError",
    "Trajectory",
    "Unrolled",
    "adam",
    "evaluate_population",
    "explain_population",
    "from_state_dict",
    "gnvp",
    "hessian",
    "hvp",
    "jacobian",
    "layout_from_json",
    "layout_to_json",
    "load_checkpoint",
    "load_flat",
    "load_trajectory",
    "member_module",
    "member_vector",
    "per_example_grads",
    "save_checkpoint",
    "save_flat",
    "save_trajectory",
    "sgd",
    "to_module_state_dict",
    "to_wrapper_state_dict",
    "unroll",
]
__version__ = "0.1.0"
