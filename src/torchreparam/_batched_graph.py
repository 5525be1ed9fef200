"""The batched plan of any module: its forward traced once into a graph, run for all members.

``torch.fx`` traces the root's ``forward`` once; modules that have a rule
(:mod:`._batched_rules`, :mod:`._batched_attention`) stay single nodes, every other module's
``forward`` is traced through, so arbitrary forward code (residual blocks, custom heads)
becomes a graph of layers and functions. :mod:`._batched_run` runs the graph for a population,
each node once for all members.

A graph is trusted only while what it baked in still holds, rechecked before every use: the
classes, instance-level ``forward``, hooks (which tracing bypasses), children, train/eval modes
and every plain attribute of every module of the tree (a graph bakes Python values in), and no
global module hook. Refused at planning (then ``vmap`` or the loop runs): a forward that fx
cannot trace (data-dependent control flow), a module that updates buffers (train mode with
buffers), parametrized or frozen weights, an in-place operation on a shared value, a weight
that reaches the forward as a plain tensor instead of a parameter.
"""

from __future__ import annotations

import operator
import threading
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._batched import _called_as_torch_defines, _global_hooks, _hooked, defined_forward
from ._batched_attention import call_rule, no_rule_reason, outputs
from ._batched_functions import FUNCTIONS, METHODS
from ._batched_rules import module_rule
from ._inject import Core, bind
from ._layout import FlatLayout

__all__ = ["GraphPlan", "graph_plan"]

_TRACING = threading.Lock()
_INPLACE_METHODS_SUFFIX = "_"
_BATCH_NORM = nn.modules.batchnorm._BatchNorm.forward  # (in train mode: statistics per member)
_INPLACE_OPERATORS = frozenset(
    [operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow,
     operator.iand, operator.ior, operator.imatmul, operator.setitem]
)  # fmt: skip
_OUT_OF_PLACE = frozenset(
    [operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.mul,
     torch.relu, torch.tanh, torch.sigmoid]
)  # fmt: skip
_INPLACE_FLAG = frozenset([torch.nn.functional.relu, torch.nn.functional.dropout])


class _Refused(Exception):
    """The module has no graph plan (the reason is the message)."""


class GraphPlan:
    """A traced graph of a module tree and what it assumed of each module."""

    __slots__ = (
        "constants", "dead", "graph", "leaves", "nodes", "params", "root", "seen", "vmapped"
    )  # fmt: skip

    def __init__(
        self,
        root: nn.Module,
        graph: fx.Graph,
        constants: dict[str, Tensor],
        leaves: dict[str, nn.Module],
        seen: tuple[tuple[nn.Module, Any], ...],
    ) -> None:
        self.root, self.graph, self.constants, self.leaves, self.seen = (
            root, graph, constants, leaves, seen
        )  # fmt: skip
        self.nodes = tuple(graph.nodes)
        self.vmapped = tuple(
            _describe(n) for n in self.nodes if n.op in ("call_function", "call_method")
            and _rule_of(n) is None
        )  # fmt: skip
        self.params: dict[str, int] = {}
        # per node, the values no later node reads: dropped once it ran (intermediates kept to
        # the end would make every call map fresh memory: page faults, measured 2.7x vmap's)
        last = {n: i for i, node in enumerate(self.nodes) for n in (node, *node.all_input_nodes)}
        dead: list[list[fx.Node]] = [[] for _ in self.nodes]
        for n, i in last.items():
            if n.op != "output":
                dead[i].append(n)
        self.dead = tuple(tuple(d) for d in dead)

    def holds(self, root: nn.Module) -> bool:
        if root is not self.root or _global_hooks():
            return False
        return all(_state(m) == state for m, state in self.seen)


def _describe(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", repr(target))


def _rule_of(node: fx.Node) -> Any:
    if node.op == "call_method":
        return METHODS.get(node.target)  # type: ignore[arg-type]
    if node.target is operator.getitem:
        return True  # (containers: indexed directly; tensors: under vmap)
    return FUNCTIONS.get(node.target)


def _state(module: nn.Module) -> tuple[Any, ...]:
    """What a graph of ``module`` baked in: class, hooks, mode, children, plain attributes."""
    state = module.__dict__
    plain = tuple(
        (k, v if isinstance(v, int | float | str | bool | type(None)) else id(v))
        for k, v in state.items()
        if not k.startswith("_") or k in ("_torchreparam_plain",)
    )
    return (type(module), _hooked(module), tuple(state["_modules"].values()), plain)


def _inplace(op: Any) -> Any:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    return method


class _Proxy(fx.Proxy):
    """Records ``x += y`` as ``operator.iadd`` (fx's own Proxy records ``operator.add``,
    which would lose the change of ``x`` in place)."""

    __iadd__ = _inplace(operator.iadd)
    __isub__ = _inplace(operator.isub)
    __imul__ = _inplace(operator.imul)
    __itruediv__ = _inplace(operator.itruediv)


class _Tracer(fx.Tracer):
    """fx's tracer, for this thread only: while it traces, fx routes every ``nn.Module`` call
    and attribute read of the process through it (it patches ``nn.Module.__call__`` and
    ``__getattr__``); those of other threads run as torch runs them."""

    def __init__(self, layout: FlatLayout, flat: Tensor) -> None:
        super().__init__(autowrap_functions=())
        self.thread = threading.get_ident()
        self.layout, self.flat_ptr = layout, flat.untyped_storage().data_ptr()
        self.constants: dict[str, Tensor] = {}
        self.leaves: dict[str, nn.Module] = {}

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if module_rule(m) is None and call_rule(m) is None:
            why = no_rule_reason(m)
            if why is not None:
                raise _Refused(f"module {qualname!r} ({why})")
            return False
        self.leaves[qualname] = m
        return True

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self.thread:
            return attr_val  # (another thread's read: the attribute itself)
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if threading.get_ident() != self.thread:
            return forward(*args, **kwargs)  # (another thread's call: nn.Module.__call__)
        out = super().call_module(m, forward, args, kwargs)
        if call_rule(m) is None or not isinstance(out, fx.Proxy):
            return out
        # (a tuple the forward code can unpack and test: `weights is None` holds as it would)
        kinds = outputs(m, args, kwargs)
        return tuple(None if kind is None else out[i] for i, kind in enumerate(kinds))  # type: ignore[index]

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, Tensor) and not isinstance(a, nn.Parameter):
            if any(a is b for b in self.root.buffers()):
                return super().create_arg(a)
            if a.untyped_storage().data_ptr() == self.flat_ptr:
                raise _Refused("a weight reaches the forward as a plain tensor")
            name = f"_constant{len(self.constants)}"
            self.constants[name] = a
            return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)


def graph_plan(root: nn.Module, core: Core, memo: dict[str, Any]) -> GraphPlan | str:
    """The graph plan of ``root``, or the reason it has none (remembered while it holds)."""
    cached = memo.get("graph")
    if isinstance(cached, GraphPlan) and cached.holds(root):
        return cached
    reason = memo.get("graph_refused")
    if reason is not None and reason[0] == _tree_state(root):
        return reason[1]
    try:
        with _TRACING:  # (fx patches nn.Module's call path while it traces: one at a time, so
            # that the patches nest; other threads' calls pass through: see _Tracer)
            made = _make(root, core)
    except _Refused as refused:
        memo["graph_refused"] = (_tree_state(root), str(refused))
        return str(refused)
    except Exception as error:  # fx cannot trace it: data-dependent control flow, say
        why = f"torch.fx cannot trace the forward ({type(error).__name__}: {error})"
        memo["graph_refused"] = (_tree_state(root), why)
        return why
    memo["graph"] = made
    return made


def _tree_state(root: nn.Module) -> tuple[Any, ...]:
    return (bool(_global_hooks()), *(_state(m) for m in root.modules()))


def _make(root: nn.Module, core: Core) -> GraphPlan:
    layout = core.layout
    if _global_hooks():
        raise _Refused("global module hooks are registered")
    for name, m in root.named_modules():
        where = f"module {name or '(root)'!r} ({type(m).__name__})"
        if _hooked(m) or not _called_as_torch_defines(type(m)):
            raise _Refused(f"{where} has hooks or a patched forward/__call__")
        if parametrize.is_parametrized(m):
            raise _Refused(f"{where} is parametrized")
        if (
            m.training
            and next(m.buffers(recurse=False), None) is not None
            and not (module_rule(m) is not None and defined_forward(m) is _BATCH_NORM)
        ):
            raise _Refused(f"{where} is in train mode with buffers (it may update them)")
    tracer = _Tracer(layout, core.flat())
    own = core.own_buffers()
    copies = [b.clone() for b in own]
    given = list(copies)
    before = _tree_state(root)
    with torch.no_grad(), bind(core, None, copies):  # (a buffer it reassigns lands in copies)
        graph = tracer.trace(root)
    if any(
        a is not b or not torch.equal(a, b0) for a, b, b0 in zip(copies, given, own, strict=True)
    ):
        raise _Refused("the forward changes a buffer (the graph would not)")
    if _tree_state(root) != before:
        raise _Refused("the forward changes its modules' attributes (the graph would not)")
    produced = {n for n in graph.nodes if n.op == "call_module" or _fresh(n)}
    for node in graph.nodes:
        _check_node(node, tracer.leaves, layout, produced)
    seen = tuple((m, _state(m)) for m in root.modules())
    made = GraphPlan(root, graph, tracer.constants, tracer.leaves, seen)
    made.params = {name: layout.position(name) for name in layout.names}
    for alias_owner in layout.entries:
        for alias in alias_owner.aliases:
            made.params[alias] = layout.position(alias_owner.name)
    return made


def _random(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers (dropout in training, ``rand*``, ``bernoulli``)."""
    name = _describe(node)
    if "dropout" in name:
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        rate = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        return bool(training is not False and rate != 0)
    return any(word in name for word in ("rand", "bernoulli", "normal", "multinomial", "poisson"))


def _fresh(node: fx.Node) -> bool:
    """Whether ``node`` makes a new tensor (an out-of-place elementwise function)."""
    if node.op == "call_method":
        return node.target in ("add", "sub", "mul", "div", "relu", "tanh", "sigmoid", "exp")
    return node.op == "call_function" and node.target in _OUT_OF_PLACE


def _check_node(
    node: fx.Node, leaves: dict[str, nn.Module], layout: FlatLayout, produced: set[fx.Node]
) -> None:
    if node.op == "call_module":
        module = leaves[node.target]  # type: ignore[index]
        several = call_rule(module)
        _, names = several or module_rule(module)  # type: ignore[misc]
        for attr in names:
            owner, _, leaf = attr.rpartition(".")
            params = module.get_submodule(owner)._parameters
            if params.get(leaf) is not None and f"{node.target}.{attr}" not in layout:
                raise _Refused(f"weight {node.target}.{attr!r} is not in flat_param (frozen)")
        if several is None and (node.kwargs or len(node.args) != 1):
            raise _Refused(f"module {node.target!r} is called with other than one input")
    if node.op in ("call_method", "call_function") and _random(node):
        raise _Refused(
            f"{_describe(node)} draws random numbers (each member draws its own in the loop; "
            "vmap or the loop run it)"
        )
    if node.op in ("call_method", "call_function"):
        target = node.target
        inplace = (
            (isinstance(target, str) and target.endswith(_INPLACE_METHODS_SUFFIX))
            or target in _INPLACE_OPERATORS
            or node.kwargs.get("inplace") is True
            or (len(node.args) > 1 and target in _INPLACE_FLAG and node.args[-1] is True)
        )
        first = node.args[0] if node.args else None
        if inplace and not (isinstance(first, fx.Node) and first in produced):
            raise _Refused(
                f"{_describe(node)} changes in place a value that is not a layer's or an "
                "arithmetic output (an input, a buffer, a view of one)"
            )
