"""Running a graph plan (:mod:`._batched_graph`) for a population: each node once for all members.

A module node runs by its rule over the members' stacked weights (:mod:`._batched_rules`,
:mod:`._batched_attention`), a function node by its rule (:mod:`._batched_functions`) or, where
none exists, under ``torch.func.vmap`` for that node alone. Nodes that read no member's value
(shared inputs, buffers) run once, as shared values. Each value is dropped after the last node
that reads it, as eager code frees it.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._batched_attention import call_rule
from ._batched_functions import FUNCTIONS, METHODS
from ._batched_graph import GraphPlan
from ._batched_rules import Stacked, module_rule

__all__ = ["run_graph"]


def run_graph(
    made: GraphPlan,
    rows: tuple[Tensor, ...],
    args: tuple[Any, ...],
    dims: tuple[int | None, ...],
    buffers: dict[str, Stacked],
    randomness: str,
) -> Any:
    """The population's output (stacked leaves), or ``None`` when an input does not fit."""
    population = rows[0].shape[0] if rows else 0
    if not rows:
        return None
    env: dict[fx.Node, Stacked] = {}
    placeholders = iter(zip(args, dims, strict=True))
    gone: tuple[fx.Node, ...] = ()  # (what the previous node read last)
    for node, dead in zip(made.nodes, made.dead, strict=True):
        for value in gone:
            del env[value]
        gone = dead
        op = node.op
        if op == "placeholder":
            given = next(placeholders, None)
            if given is None:
                if not node.args:
                    return None
                env[node] = Stacked(node.args[0], False)  # a default value
            else:
                env[node] = Stacked(given[0], given[1] == 0)
        elif op == "get_attr":
            env[node] = _attr(made, node.target, rows, buffers)
        elif op == "call_module":
            layer = _module(made, node, env, rows, buffers, population)
            if layer is None:
                return None
            env[node] = layer
        elif op in ("call_function", "call_method"):
            out = _call(node, env, randomness)
            if out is None:
                return None
            env[node] = out
        else:  # output
            result = tree_map(
                lambda n: env[n] if isinstance(n, fx.Node) else Stacked(n, False), node.args[0]
            )
            return _output(result, population)
    return None


def _attr(made: GraphPlan, target: str, rows: tuple[Tensor, ...],
          buffers: dict[str, Stacked]) -> Stacked:  # fmt: skip
    if target in made.params:
        return Stacked(rows[made.params[target]], True)
    if target in buffers:
        return buffers[target]
    if target in made.constants:
        return Stacked(made.constants[target], False)
    return Stacked(_get(made.root, target), False)


def _get(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _module(made: GraphPlan, node: fx.Node, env: dict[fx.Node, Stacked], rows: tuple[Tensor, ...],
            buffers: dict[str, Stacked], population: int) -> Stacked | None:  # fmt: skip
    target = node.target
    assert isinstance(target, str)
    module = made.leaves[target]
    several = call_rule(module)
    single = module_rule(module)
    names = several[1] if several is not None else single[1]  # type: ignore[index]
    weights: dict[str, Tensor | None] = {}
    for attr in names:
        full = f"{target}.{attr}"
        if full in made.params:
            weights[attr] = rows[made.params[full]]
        elif full in buffers:
            weights[attr] = buffers[full].value
        else:
            weights[attr] = None
    if several is not None:
        args, kwargs = tree_map(
            lambda v: env[v] if isinstance(v, fx.Node) else Stacked(v, False),
            (node.args, node.kwargs),
        )
        return several[0](module, weights, args, kwargs, population)
    x = env[node.args[0]]  # type: ignore[index]
    if not isinstance(x.value, Tensor):
        return None
    out = single[0](module, weights, x.value, x.stacked, population)  # type: ignore[index]
    return None if out is None else Stacked(out, True)


def _call(node: fx.Node, env: dict[fx.Node, Stacked], randomness: str) -> Stacked | None:
    flat, spec = tree_flatten((node.args, node.kwargs))
    values = [env[v] if isinstance(v, fx.Node) else Stacked(v, False) for v in flat]
    stacked = tuple(v.stacked for v in values)
    plain = [v.value for v in values]
    args, kwargs = tree_unflatten(plain, spec)
    target = node.target
    if not any(stacked):  # every member computes the same: once
        fn = getattr(args[0], target) if isinstance(target, str) else target
        return Stacked(fn(*(args[1:] if isinstance(target, str) else args), **kwargs), False)
    if target is operator.getitem and not isinstance(args[0], Tensor):
        return Stacked(args[0][args[1]], stacked[0])  # (a container of stacked values)
    top = tuple(env[a].stacked if isinstance(a, fx.Node) else False for a in node.args)
    rule = METHODS.get(target) if isinstance(target, str) else FUNCTIONS.get(target)
    if rule is not None and not any(  # (tensors nested in containers: vmap sees them)
        isinstance(a, list | tuple) and any(isinstance(x, Tensor) for x in a) for a in args
    ):
        out = rule(target, tuple(args), dict(kwargs), top)
        if out is not NotImplemented:
            return Stacked(out, isinstance(out, Tensor))
    return _vmapped(target, flat, spec, values, randomness)


def _vmapped(target: Any, flat: list[Any], spec: Any, values: list[Stacked],
             randomness: str) -> Stacked | None:  # fmt: skip
    """One node under ``vmap``: its stacked operands mapped over, the rest closed over."""
    mapped = [i for i, v in enumerate(values) if v.stacked and isinstance(v.value, Tensor)]
    if len(mapped) != sum(v.stacked for v in values):
        return None  # (a stacked container: not a tensor vmap can map over)

    def member(*tensors: Tensor) -> Any:
        plain = [v.value for v in values]
        for i, t in zip(mapped, tensors, strict=True):
            plain[i] = t
        args, kwargs = tree_unflatten(plain, spec)
        if isinstance(target, str):
            return getattr(args[0], target)(*args[1:], **kwargs)
        return target(*args, **kwargs)

    out = torch.func.vmap(member, randomness=randomness)(*(values[i].value for i in mapped))
    return Stacked(out, True)


def _output(result: Any, population: int) -> Any:
    result = _plain_containers(result)
    leaves, spec = tree_flatten(result, is_leaf=lambda v: isinstance(v, Stacked))
    out: list[Tensor | None] = []
    for leaf in leaves:
        value = leaf.value if isinstance(leaf, Stacked) else leaf
        if value is None:
            out.append(None)
        elif not isinstance(value, Tensor):
            return None  # (values that are not tensors: the loop gives each member's)
        elif leaf.stacked:
            out.append(value.contiguous())
        else:  # computed once: every member's copy
            out.append(value.unsqueeze(0).expand(population, *value.shape).contiguous())
    return tree_unflatten(out, spec)


def _plain_containers(value: Any) -> Any:
    """fx's immutable lists and dicts in an output as plain ones (as the module returns), and
    a layer's tuple output (attention's ``(output, weights)``) as a tuple of its values."""
    if isinstance(value, Stacked) and type(value.value) is tuple:
        return tuple(Stacked(v, value.stacked) for v in value.value)
    if isinstance(value, dict):
        return {k: _plain_containers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_containers(v) for v in value]
    if type(value) is tuple:
        return tuple(_plain_containers(v) for v in value)
    return value
