"""What the generated classes refuse, and how a submodule is copied out of a wrapped tree.

Module surgery after wrapping would leave ``flat_param`` describing another model: a replaced
or deleted submodule whose weights live in ``flat_param``, a new parameter or buffer outside
it. Each is refused before anything changes, with what to do instead. A deep copy of the
unwrapped module or of one submodule (not a copy of the wrapper, which copies the whole tree) is
a plain module holding copies of its own weights only.

Parametrizations and hook-based utilities change which tensors hold a module's weights; they are
recognised at their first step, before they change anything: ``register_parametrization`` and
``remove_parametrizations`` by the ``parametrizations`` lookup they start with (their own code
objects, compared: no other caller is affected), and utilities that take a parameter out of
``module._parameters`` (the old ``nn.utils.spectral_norm`` and ``weight_norm``) by the missing
key (:class:`ManagedParameters`).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._inject import CORE_KEY

__all__ = [
    "PARAMETRIZATIONS",
    "TREE_COPY",
    "ManagedParameters",
    "check_child",
    "check_new_tensor",
    "plain_copy",
]

TREE_COPY = "_torchreparam_tree_copy"  # set in a deepcopy memo while a whole tree is copied

_REWRAP = (
    "make structural changes before wrapping (or build a new ReparamModule from a plain copy: "
    "copy.deepcopy of a submodule is one)"
)


def _holds_state(module: nn.Module) -> bool:
    """Whether any module of this subtree has weights or buffers (managed or not)."""
    return any(
        any(p is not None for p in m._parameters.values())
        or any(b is not None for b in m._buffers.values())
        or getattr(getattr(type(m), "_torchreparam_spec", None), "order", ())
        for m in module.modules()
    )


def check_child(owner: nn.Module, name: str, value: Any, operation: str) -> None:
    """Refuse replacing, adding or deleting a child module that holds weights or buffers."""
    if owner.__dict__.get("_is_replica"):
        return  # torch.nn.parallel.replicate fills a replica (DataParallel) with child replicas
    old = owner._modules.get(name)
    where = f"{type(owner).__name__}.{name}"
    if old is not None and old is not value and _holds_state(old):
        raise ValueError(
            f"{operation} {where} of a model wrapped by torchreparam: its weights live in "
            f"flat_param, which would then describe another model (and the new module would "
            f"train outside it); {_REWRAP}"
        )
    if isinstance(value, nn.Module) and value is not old and _holds_state(value):
        core = owner.__dict__[CORE_KEY]
        if all(m.__dict__.get(CORE_KEY) is core for m in value.modules()):
            return  # a module of this tree placed again (weights shared, already in flat_param)
        raise ValueError(
            f"{operation} {where} of a model wrapped by torchreparam with a module that has "
            f"parameters or buffers: they would live outside flat_param (not trained through "
            f"it, not in its state dict, not swapped by calls with another vector); {_REWRAP}"
        )


def check_new_tensor(owner: nn.Module, name: str, kind: str) -> None:
    """Refuse registering a new parameter or buffer on a wrapped module."""
    if owner.__dict__.get("_is_replica"):
        return  # replicate() sets the copies of frozen parameters (the originals, under no_grad)
    raise ValueError(
        f"register_{kind}({name!r}) on {type(owner).__name__}, a module of a model wrapped by "
        f"torchreparam: the new {kind} would live outside flat_param (its layout is fixed at "
        f"wrapping); {_REWRAP}. torch.nn.utils.prune and parametrizations register tensors: "
        "apply them before wrapping (parametrizations), or prune.remove before wrapping"
    )


class _Refused(ValueError, KeyError):
    """A refusal where a dict lookup would raise ``KeyError`` (code catching that still does)."""

    def __str__(self) -> str:
        return str(self.args[0])


_NAMED_MEMBERS = nn.Module._named_members.__code__


class ManagedParameters(dict):
    """A managed module's ``_parameters``: a plain dict of the parameters outside ``flat_param``
    (iteration, ``in`` and ``get`` are dict's own), where reading or deleting the name of a
    managed parameter is refused with what to do instead of a bare ``KeyError``.

    ``items()`` lists the managed parameters too (the leaves), in registration order, to one
    reader: ``nn.Module.named_parameters()`` of a module that holds this tree but not its
    wrapper (``nn.Sequential(net, head).parameters()``), as it would on a plain module. A walk
    that passes through the wrapper lists ``flat_param`` there instead (an optimizer of
    ``nn.Sequential(r, head).parameters()`` must not step each weight twice), and so does one
    that starts at a module of the tree itself with ``recurse=False`` (DDP and FSDP collect
    parameters that way, and must find ``flat_param`` alone)."""

    def __init__(
        self,
        items: Iterable[tuple[str, Any]],
        owner: str,
        managed: Iterable[str],
        order: Iterable[tuple[str, int | None]] = (),
    ):
        super().__init__(items)
        self.owner = owner
        self.managed = frozenset(managed)
        self.order = tuple(order)

    def items(self) -> Any:
        if not getattr(self, "order", ()) or torch.compiler.is_dynamo_compiling():
            return dict.items(self)
        try:  # (items <- named_parameters' lambda <- _named_members)
            caller = sys._getframe(1)
        except ValueError:  # (called from C with no Python frame above: pickle, for one)
            return dict.items(self)
        walk = caller.f_back
        if walk is None or walk.f_code is not _NAMED_MEMBERS:
            return dict.items(self)
        module = caller.f_locals.get("module")  # (the lambda's argument: the owner)
        if not isinstance(module, nn.Module) or module._parameters is not self:
            return dict.items(self)
        core = module.__dict__.get(CORE_KEY)
        if core is None or not _outside_the_wrapper(walk, core):
            return dict.items(self)
        return [
            (name, dict.__getitem__(self, name) if slot is None else core.leaf(slot))
            for name, slot in self.order
            if slot is not None or dict.__contains__(self, name)
        ]

    def _refuse(self, key: object, operation: str) -> None:
        if key in self.managed:
            raise _Refused(
                f"{operation} module._parameters[{key!r}] of {self.owner}, a module of a model "
                f"wrapped by torchreparam: its values live in flat_param (read module.{key}), "
                "and hook-based utilities that take a parameter out of _parameters "
                "(nn.utils.spectral_norm, nn.utils.weight_norm) cannot apply after wrapping; use "
                "torch.nn.utils.parametrizations (spectral_norm, weight_norm, orthogonal), "
                "registered before wrapping"
            )

    def __missing__(self, key: str) -> Any:
        self._refuse(key, "reading")
        raise KeyError(key)

    def __delitem__(self, key: str) -> None:
        if not dict.__contains__(self, key):
            self._refuse(key, "deleting")
        dict.__delitem__(self, key)


def _outside_the_wrapper(walk: Any, core: Any) -> bool:
    """Whether the parameter walk ``walk`` (a frame of ``nn.Module._named_members``) starts at
    a module outside the tree of ``core`` whose submodules do not include the wrapper.

    Answered once per walk and tree: the answer is left in the walk's own ``memo`` set (a
    marker object of the tree's), which lives as long as the walk."""
    local = walk.f_locals
    root, memo = local.get("self"), local.get("memo")
    markers = core.__dict__.get("_walk_markers")
    if markers is None:
        markers = core.__dict__["_walk_markers"] = (_Marker(), _Marker())  # (outside, inside)
    if isinstance(memo, set):
        if markers[0] in memo:
            return True
        if markers[1] in memo:
            return False
    holder = core._holder()
    answer = (
        isinstance(root, nn.Module)
        and CORE_KEY not in root.__dict__
        and (holder is None or all(m is not holder for m in root.modules()))
    )
    if isinstance(memo, set):
        memo.add(markers[0] if answer else markers[1])
    return answer


class _Marker:
    """A walk's answer for one tree, kept in the walk's memo set (compared by identity)."""


_CHANGERS = {  # code -> (name, what to do)
    parametrize.register_parametrization.__code__: (
        "register_parametrization",  # (parametrizations.weight_norm, orthogonal, ... call it)
        "register parametrizations (parametrizations.weight_norm, orthogonal, spectral_norm, "
        "...) before wrapping",
    ),
    parametrize.remove_parametrizations.__code__: (
        "remove_parametrizations",
        "remove parametrizations before wrapping",
    ),
}
_IS_PARAMETRIZED = parametrize.is_parametrized.__code__


class _Parametrizations:
    """``module.parametrizations`` of a module of a wrapped tree: what torch's lookup finds
    (``_modules["parametrizations"]``, else AttributeError), except for the lookup with which
    ``register_parametrization`` and ``remove_parametrizations`` start, which is refused."""

    def __get__(self, module: nn.Module | None, owner: type | None = None) -> Any:
        if module is None:
            return self
        caller = None if torch.compiler.is_dynamo_compiling() else sys._getframe(1)
        if caller is not None and caller.f_code is _IS_PARAMETRIZED and caller.f_back is not None:
            changer = _CHANGERS.get(caller.f_back.f_code)
            if changer is not None:
                name = caller.f_locals.get("tensor_name")
                cls = type(module).__name__
                raise ValueError(
                    f"{changer[0]}({cls}, {name!r}) on a model wrapped by torchreparam: {cls} "
                    "does not have a parameter, a buffer, or a parametrized element with name "
                    f"{name!r} any more (its weights live in flat_param, whose layout is fixed at "
                    f"wrapping); {changer[1]}"
                )
        found = module.__dict__["_modules"].get("parametrizations")
        if found is None:
            raise AttributeError(
                f"'{type(module).__name__}' object has no attribute 'parametrizations'"
            )
        return found


PARAMETRIZATIONS = _Parametrizations()


def plain_copy(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """A deep copy of ``module`` (a submodule of a wrapped tree) as a plain module: the
    classes it had before wrapping, real parameters holding copies of its current weights
    (tied ones still tied), no reference to the wrapper or to the rest of ``flat_param``."""
    params: dict[int, nn.Parameter] = {}  # one new parameter per weight (tied stay tied)
    clones = {}
    for sub in module.modules():
        spec = getattr(type(sub), "_torchreparam_spec", None)
        base = type(sub) if spec is None else spec.base
        clone = object.__new__(base)
        memo[id(sub)] = clone
        clones[id(sub)] = (sub, clone, spec)
    for sub, clone, spec in clones.values():
        state = {k: v for k, v in sub.__dict__.items() if k != CORE_KEY}
        if spec is not None:
            state["_parameters"] = _own_parameters(sub, spec, params)
            for attr, names in spec.derived:  # derived lists (RNN's _flat_weights)
                state[attr] = [None if n is None else state["_parameters"][n] for n in names]
        clone.__dict__.update(copy.deepcopy(state, memo))
    return memo[id(module)]


def _own_parameters(
    sub: nn.Module, spec: Any, made: dict[int, nn.Parameter]
) -> dict[str, nn.Parameter | None]:
    out: dict[str, nn.Parameter | None] = {}
    for name, slot in spec.order:
        if slot is None:
            out[name] = sub._parameters.get(name)
            continue
        value: Tensor = getattr(sub, name)
        key = slot
        if key not in made:
            with torch.no_grad():
                data = value.detach().clone(memory_format=torch.contiguous_format)
            made[key] = nn.Parameter(data, requires_grad=value.requires_grad)
        out[name] = made[key]
    for name, registered in sub._parameters.items():  # None ones (Linear(bias=False))
        out.setdefault(name, registered)
    return out
