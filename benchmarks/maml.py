"""MAML meta-step: 5 inner SGD steps with ``create_graph=True``, outer gradient to theta_0."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from torchreparam import unroll

from .context import Context
from .models import Model, conv4, loss_of, mlp
from .peers import HIGHER, ORIGINAL, OURS, Contenders, NotInstalled, Peers, optional
from .report import TIMING_HEADERS, Table, at_most, timing_rows
from .timing import Timing

__all__ = ["maml_case"]

STEPS, LR = 5, 0.1
FOREACH = "torch.func: functional_call, per-tensor dict, torch._foreach_add"
FUNC_DICT = "torch.func: functional_call, dict comprehension updates"
FUNC_GRAD = "torch.func: grad transform of functional_call"
UNROLL = "torchreparam.unroll, memory='full'"
TORCHOPT_META = "torchopt.MetaSGD on the module, recover_state_dict per meta-step"
TORCHOPT_FUNC = "torchopt.sgd (functional), functional_call, apply_updates"


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


def _torchopt_meta_step(p: Peers) -> Callable[[], tuple[Tensor, ...]]:
    """torchopt's MAML recipe: ``MetaSGD`` steps the module's own parameters differentiably;
    the state extracted before the first step is recovered before each meta-step."""
    torchopt = optional("torchopt")
    net = p.copy()
    leaves = list(net.parameters())
    with torch.no_grad():  # start from theta, as every contender
        for leaf, value in zip(leaves, p.views(p.theta), strict=True):
            leaf.copy_(value)
    inner = torchopt.MetaSGD(net, lr=LR)
    net_state = torchopt.extract_state_dict(net, by="reference")
    inner_state = torchopt.extract_state_dict(inner, by="reference")
    (x,), y = p.model.inputs, p.model.target

    def step() -> tuple[Tensor, ...]:
        torchopt.recover_state_dict(net, net_state)
        torchopt.recover_state_dict(inner, inner_state)
        for _ in range(STEPS):
            inner.step(loss_of(net(x), y))
        return torch.autograd.grad(loss_of(net(x), y), leaves)

    return step


def _torchopt_func_step(
    net: nn.Module, model: Model, params0: dict[str, Tensor]
) -> tuple[Tensor, ...]:
    """torchopt's functional API: an ``sgd`` transformation over a tuple of tensors."""
    torchopt = optional("torchopt")
    (x,), y = model.inputs, model.target
    names, ps = list(params0), tuple(params0.values())
    optimizer = torchopt.sgd(LR)
    state = optimizer.init(ps)
    for _ in range(STEPS):
        loss = loss_of(functional_call(net, dict(zip(names, ps, strict=True)), (x,)), y)
        gs = torch.autograd.grad(loss, ps, create_graph=True)
        updates, state = optimizer.update(gs, state, inplace=False)
        ps = torchopt.apply_updates(ps, updates, inplace=False)
    loss = loss_of(functional_call(net, dict(zip(names, ps, strict=True)), (x,)), y)
    return torch.autograd.grad(loss, list(params0.values()))


def _or_missing(make: Callable[[], Callable[[], object]]) -> Callable[[], object]:
    """The contender ``make`` builds, or (an optional peer not installed) one that says so."""
    try:
        return make()
    except NotInstalled as e:
        missing = e

        def call() -> object:
            raise missing

        return call


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
        TORCHOPT_META: _or_missing(lambda: _torchopt_meta_step(p)),
        TORCHOPT_FUNC: lambda: _torchopt_func_step(net, model, params0),
    }


def check_agreement(contenders: Mapping[str, Callable[[], object]]) -> dict[str, str]:
    """Call every contender once and compare its meta-gradient (as one flat vector) with ours:
    ``{name: why}`` for those that disagree, to be reported instead of timed (those that raise
    are left to the timing's own probe)."""
    reference = _flat(contenders[OURS]())
    wrong = {}
    for name, fn in contenders.items():
        try:
            got = _flat(fn())
        except Exception:  # (the probe reports it)
            continue
        if not torch.allclose(got, reference, rtol=1e-4, atol=1e-6):
            diff = (got - reference).abs().max().item()
            wrong[name] = f"fails: its meta-gradient differs from ours (max |diff| {diff:.2e})"
    return wrong


def _flat(grads: object) -> Tensor:
    if isinstance(grads, Tensor):
        return grads.reshape(-1)
    assert isinstance(grads, tuple)
    return torch.cat([g.reshape(-1) for g in grads])


def _table(ctx: Context, model: Model, target: bool) -> Table:
    p = Peers(ctx.on_device(model))
    budget = ctx.scaled(0.6, 2.0) if target else ctx.scaled(0.3, 4.0, warmup=1)
    contenders = maml_contenders(p)
    wrong = check_agreement(contenders)
    right = {k: v for k, v in contenders.items() if k not in wrong}
    timings, failed = ctx.measure(right, FOREACH, budget)
    failed = {**failed, **wrong}
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
            "tensor op per step",
            "every row's meta-gradient is compared with ours before it is timed (rtol 1e-4); "
            "torchopt's rows: its MAML recipe (MetaSGD stepping the module, its state recovered "
            "before each meta-step) and its functional sgd over functional_call",
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
