"""Differentiable inner-loop steps against torch.optim, and gradients to hyperparameters."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import build

from torchreparam import FlatLayout, adam, sgd

D = torch.float64
SGD_CASES = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    {"lr": 0.05, "momentum": 0.5, "dampening": 0.1},
]
ADAM_CASES = [{"lr": 0.01}, {"lr": 0.003, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}]


def _grads(steps: int, n: int) -> list[torch.Tensor]:
    return [torch.randn(n, dtype=D) for _ in range(steps)]


@pytest.mark.parametrize("hyper", SGD_CASES)
def test_sgd_matches_torch_optim_step_for_step(hyper: dict) -> None:  # type: ignore[type-arg]
    start, grads = torch.randn(20, dtype=D), _grads(6, 20)
    param = torch.nn.Parameter(start.clone())
    opt = torch.optim.SGD([param], foreach=False, **hyper)
    theta, state = start.clone(), None
    for g in grads:
        param.grad = g.clone()
        opt.step()
        theta, state = sgd(theta, g, state, **hyper)
        torch.testing.assert_close(theta, param.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("hyper", ADAM_CASES)
def test_adam_matches_torch_optim_step_for_step(hyper: dict) -> None:  # type: ignore[type-arg]
    start, grads = torch.randn(20, dtype=D), _grads(6, 20)
    param = torch.nn.Parameter(start.clone())
    opt = torch.optim.Adam([param], foreach=False, **hyper)
    theta, state = start.clone(), None
    for g in grads:
        param.grad = g.clone()
        opt.step()
        theta, state = adam(theta, g, state, **hyper)
        torch.testing.assert_close(theta, param.detach(), rtol=1e-10, atol=1e-12)
    assert state is not None
    assert state.step == 6


def _unrolled(r, theta0, lr, x, y, step_fn, steps: int = 3, **hyper):  # type: ignore[no-untyped-def]
    """Dataset-distillation style: a loss after a few differentiable inner steps."""
    theta, state = theta0, None
    for _ in range(steps):
        loss = F.cross_entropy(r(x, flat_param=theta), y)
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta, state = step_fn(theta, g, state, lr=lr, **hyper)
    return F.cross_entropy(r(x, flat_param=theta), y)


@pytest.mark.parametrize(("step_fn", "hyper"), [(sgd, {"momentum": 0.9}), (adam, {})])
def test_gradcheck_for_a_learned_learning_rate(step_fn, hyper) -> None:  # type: ignore[no-untyped-def]
    r, _, (x,) = build("mlp", D)
    y = torch.randint(0, 3, (4,))
    theta0 = r.flat_param.detach().clone().requires_grad_()
    lr = torch.tensor(0.05, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t, rate: _unrolled(r, t, rate, x, y, step_fn, **hyper), (theta0, lr)
    )


def test_per_layer_learning_rates_expand_over_the_layout() -> None:
    r, _, (x,) = build("mlp", D)
    y = torch.randint(0, 3, (4,))
    layout = r.layout
    rates = torch.full((len(layout),), 0.1, dtype=D, requires_grad=True)  # one per tensor
    expanded = layout.expand(rates)
    assert expanded.shape == (r.param_numel,)
    assert torch.equal(layout.view(expanded, "2.bias"), torch.full((3,), 0.1, dtype=D))
    theta0 = r.flat_param.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t, lr: _unrolled(r, t, layout.expand(lr), x, y, sgd), (theta0, rates)
    )
    per_module = layout.expand({"0": 0.5, "2.weight": 0.25, "": 1.0})
    assert layout.view(per_module, "0.bias").unique().tolist() == [0.5]
    assert layout.view(per_module, "2.weight").unique().tolist() == [0.25]
    assert layout.view(per_module, "2.bias").unique().tolist() == [1.0]


def test_expand_reports_gaps_and_strays() -> None:
    layout = FlatLayout.from_module(
        torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    )
    with pytest.raises(
        ValueError,
        match=re.escape(
            "values do not cover the layout: no value for ['1.weight', '1.bias']; keys that match no entry: ['2']"
        ),
    ):
        layout.expand({"0": 1.0, "2": 1.0})
    with pytest.raises(
        ValueError,
        match=re.escape("values must have one entry per layout entry (4), got shape (3,)"),
    ):
        layout.expand([1.0, 2.0, 3.0])


def test_steps_validate_shapes() -> None:
    with pytest.raises(
        ValueError, match=re.escape("grad has shape (2,) but theta has (3,): they must match")
    ):
        sgd(torch.zeros(3), torch.zeros(2), lr=0.1)
