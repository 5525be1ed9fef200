"""MAML meta-step: 5 inner SGD steps with ``create_graph=True``, outer gradient to theta_0."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from torchreparam import unroll

from .context import Context
from .models import Model, conv4, loss_of, mlp
from .peers import HIGHER, ORIGINAL, OURS, Contenders, Peers
from .report import TIMING_HEADERS, Table, at_most, timing_rows
from .timing import Timing

__all__ = ["maml_case"]

STEPS, LR = 5, 0.1
FOREACH = "torch.func: functional_call, per-tensor dict, torch._foreach_add"
FUNC_DICT = "torch.func: functional_call, dict comprehension updates"
FUNC_GRAD = "torch.func: grad transform of functional_call"
UNROLL = "torchreparam.unroll, memory='full'"


def _flat_step(call: Callable[[Tensor, Tensor], object], model: Model, theta0: Tensor) -> Tensor:
    """The README's MAML loss over a flat vector; returns the meta-gradient to ``theta0``."""
    (x,), y = model.inputs, model.target
    theta = theta0
    for _ in range(STEPS):
        (g,) = torch.autograd.grad(loss_of(call(x, theta), y), theta, create_graph=True)
        theta = theta - LR * g  # one tensor op per step, whatever the number of tensors
    (meta,) = torch.autograd.grad(loss_of(call(x, theta), y), theta0)
    return meta


def _unroll_step(call: Callable[[Tensor, Tensor], object], model: Model, theta0: Tensor) -> Tensor:
    """The same meta-step through :func:`torchreparam.unroll` (its own inner loop)."""
    (x,), y = model.inputs, model.target

    def inner(theta: Tensor, _: object) -> Tensor:
        return loss_of(call(x, theta), y)

    theta = unroll(inner, theta0, [None] * STEPS, memory="full", lr=LR)
    (meta,) = torch.autograd.grad(loss_of(call(x, theta), y), theta0)
    return meta


def _foreach_step(net: nn.Module, model: Model, params0: dict[str, Tensor]) -> tuple[Tensor, ...]:
    (x,), y = model.inputs, model.target
    names, ps = list(params0), list(params0.values())
    for _ in range(STEPS):
        loss = loss_of(functional_call(net, dict(zip(names, ps, strict=True)), (x,)), y)
        gs = torch.autograd.grad(loss, ps, create_graph=True)
        ps = list(torch._foreach_add(ps, gs, alpha=-LR))
    loss = loss_of(functional_call(net, dict(zip(names, ps, strict=True)), (x,)), y)
    return torch.autograd.grad(loss, list(params0.values()))


def _dict_step(net: nn.Module, model: Model, params0: dict[str, Tensor]) -> tuple[Tensor, ...]:
    (x,), y = model.inputs, model.target
    ps = params0
    for _ in range(STEPS):
        loss = loss_of(functional_call(net, ps, (x,)), y)
        gs = torch.autograd.grad(loss, list(ps.values()), create_graph=True)
        ps = {k: p - LR * g for (k, p), g in zip(ps.items(), gs, strict=True)}
    loss = loss_of(functional_call(net, ps, (x,)), y)
    return torch.autograd.grad(loss, list(params0.values()))


def _grad_transform_step(
    net: nn.Module, model: Model, params0: dict[str, Tensor]
) -> tuple[Tensor, ...]:
    (x,), y = model.inputs, model.target

    def inner_loss(ps: dict[str, Tensor]) -> Tensor:
        return loss_of(functional_call(net, ps, (x,)), y)

    inner_grad = torch.func.grad(inner_loss)
    ps = params0
    for _ in range(STEPS):
        gs = inner_grad(ps)
        ps = {k: p - LR * gs[k] for k, p in ps.items()}
    return torch.autograd.grad(inner_loss(ps), list(params0.values()))


def maml_contenders(p: Peers) -> Contenders:
    """The fastest torch.func recipe (the baseline), ours, the original and the other peers."""
    theta0 = p.theta.detach().requires_grad_()
    params0 = {k: v.detach().requires_grad_() for k, v in p.dict_from(p.theta).items()}
    net, model = p.func_net, p.model
    fmodel = p.higher_model()
    return {
        FOREACH: lambda: _foreach_step(net, model, params0),
        OURS: lambda: _flat_step(lambda x, t: p.ours(x, flat_param=t), model, theta0),
        UNROLL: lambda: _unroll_step(lambda x, t: p.ours(x, flat_param=t), model, theta0),
        ORIGINAL: lambda: _flat_step(lambda x, t: p.original(x, flat_param=t), model, theta0),
        FUNC_DICT: lambda: _dict_step(net, model, params0),
        FUNC_GRAD: lambda: _grad_transform_step(net, model, params0),
        HIGHER: lambda: _flat_step(lambda x, t: fmodel(x, params=p.views(t)), model, theta0),
    }


def _table(ctx: Context, model: Model, target: bool) -> Table:
    p = Peers(ctx.on_device(model))
    budget = ctx.scaled(0.6, 2.0) if target else ctx.scaled(0.3, 4.0, warmup=1)
    timings, failed = ctx.measure(maml_contenders(p), FOREACH, budget)
    return Table(
        key="maml",
        title=f"MAML meta-step, {model.name}",
        target="at most 0.85x the fastest torch.func recipe (functional_call with a per-tensor "
        "dict and torch._foreach_add updates), by the faster of our two rows"
        if target
        else "",
        verdict=at_most("torchreparam", _best(timings), 0.85) if target else "",
        headers=TIMING_HEADERS,
        rows=timing_rows(timings, failed),
        notes=[
            f"{STEPS} inner SGD steps (lr {LR}) with create_graph=True on the same batch, then the "
            "outer gradient to theta_0; ours and the original update the flat vector with one "
            "tensor op per step"
        ],
    )


def _best(timings: dict[str, Timing]) -> float:
    return min(timings[n].ratio for n in (OURS, UNROLL) if n in timings)


def maml_case(ctx: Context) -> list[Table]:
    """MAML on the MLP (the target) and, outside smoke mode, on the 4-block conv net."""
    tables = [_table(ctx, mlp(), target=True)]
    if not ctx.smoke:
        tables.append(_table(ctx, conv4(), target=False))
        tables[-1].notes.append("conv nets are compute-bound: no target")
    return tables
