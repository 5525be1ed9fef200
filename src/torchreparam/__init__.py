"""torchreparam: any ``nn.Module`` over one flat parameter vector, callable with any other.

The package is five layers; each imports only from those before it (no cycles, no imports
inside functions), so a reader can start at either end:

1. layout: ``_layout`` (``FlatLayout``: names, shapes, offsets and tied aliases of the flat
   vector, a frozen value), beside ``_checks`` (input checks), ``_types`` (the public type
   aliases) and ``_hooks`` (torch's global module hooks), which import nothing of ours.
2. injection: ``_views`` (a vector as the parameters' views), ``_inject`` (``Core``: the
   per-thread bindings of vectors and buffers), ``_leaves``, ``_guards``, ``_classes`` and
   ``_class_methods`` (the subclasses that make each managed module read its parameters from
   the binding), ``_recompute``.
3. call: ``_call`` (one call with a vector, undone by ``_transaction`` if it raises), ``_trace``,
   ``_population`` with ``_population_job`` and ``_batched*`` (a population of vectors in one
   call), ``_replicate`` (``nn.DataParallel``).
4. wrapper: ``_module`` (``ReparamModule``) and ``_state_dict`` (its state dicts).
5. files and extras: ``_checkpoint``, ``_files``, ``_trajectory`` (files); ``_members``,
   ``_explain``, ``_distributed`` (populations); ``_derivatives``, ``_inner``, ``_unroll*``
   (derivatives and inner loops over a flat vector); ``_demo`` (``python -m torchreparam demo``).

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
from ._types import Buffers, InDims, Output
from ._unroll import Unrolled, unroll

__all__ = [
    "AdamState",
    "Buffers",
    "FlatCheckpoint",
    "FlatLayout",
    "InDims",
    "LayoutEntry",
    "Output",
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
