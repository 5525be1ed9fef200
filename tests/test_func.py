"""torch.func transforms through the wrapper, and the derivative helpers, against references
computed with torch.func on the unwrapped twin through functional_call."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from conftest import build, unchanged
from torch import nn

from torchreparam import gnvp, hessian, hvp, jacobian, per_example_grads

D = torch.float64


def _setup(name: str = "mlp"):  # type: ignore[no-untyped-def]
    r, twin, (x,) = build(name, D)
    r.eval()
    twin.eval()
    theta = torch.randn(r.param_numel, dtype=D)

    def ours(t: torch.Tensor) -> torch.Tensor:
        return r(x, flat_param=t)

    def ref(t: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(twin, r.layout.unflatten(t), (x,))

    return r, x, theta, ours, ref


@pytest.mark.parametrize("name", ["mlp", "convbn"])
def test_torch_func_transforms_through_the_wrapper(name: str) -> None:
    _, _, theta, ours, ref = _setup(name)

    def loss_ours(t: torch.Tensor) -> torch.Tensor:
        return ours(t).square().sum()

    def loss_ref(t: torch.Tensor) -> torch.Tensor:
        return ref(t).square().sum()

    v = torch.randn_like(theta)
    torch.testing.assert_close(torch.func.grad(loss_ours)(theta), torch.func.grad(loss_ref)(theta))
    torch.testing.assert_close(torch.func.jacrev(ours)(theta), torch.func.jacrev(ref)(theta))
    torch.testing.assert_close(torch.func.jacfwd(ours)(theta), torch.func.jacrev(ref)(theta))
    torch.testing.assert_close(
        torch.func.jvp(ours, (theta,), (v,))[1], torch.func.jvp(ref, (theta,), (v,))[1]
    )
    thetas = torch.randn(3, theta.numel(), dtype=D)
    torch.testing.assert_close(torch.func.vmap(ours)(thetas), torch.func.vmap(ref)(thetas))
    if name == "mlp":
        torch.testing.assert_close(
            torch.func.hessian(loss_ours)(theta), torch.func.hessian(loss_ref)(theta)
        )


def test_grad_with_respect_to_autograd_reference() -> None:
    _, _, theta, ours, _ = _setup()
    t = theta.clone().requires_grad_()
    ours(t).sum().backward()
    torch.testing.assert_close(torch.func.grad(lambda u: ours(u).sum())(theta), t.grad)


def test_exception_inside_a_transform_leaves_the_module_intact() -> None:
    r, x, theta, ours, _ = _setup()

    def bad(t: torch.Tensor) -> torch.Tensor:
        ours(t)
        raise KeyError("inside grad")

    with unchanged(r, x), pytest.raises(KeyError):
        torch.func.grad(bad)(theta)


def test_hvp_matches_the_hessian_for_one_and_many_vectors() -> None:
    _, _, theta, ours, ref = _setup()
    full = torch.func.hessian(lambda t: ref(t).square().sum())(theta)
    v = torch.randn(theta.numel(), dtype=D)
    vs = torch.randn(4, theta.numel(), dtype=D)
    loss = lambda t: ours(t).square().sum()  # noqa: E731
    torch.testing.assert_close(hvp(loss, theta, v), full @ v)
    torch.testing.assert_close(hvp(loss, theta, vs), vs @ full.T)
    torch.testing.assert_close(hessian(loss, theta), full)


def test_hvp_through_batchnorm_in_train_mode() -> None:
    r, twin, (x,) = build("convbn", D)
    theta = torch.randn(r.param_numel, dtype=D)
    v = torch.randn_like(theta)

    def loss(t: torch.Tensor) -> torch.Tensor:
        return r.pure(x, flat_param=t)[0].square().sum()

    def loss_ref(t: torch.Tensor) -> torch.Tensor:
        names = [n for n, _ in twin.named_buffers()]
        bufs = {n: b.clone() for n, b in zip(names, twin.buffers(), strict=True)}
        return (
            torch.func.functional_call(twin, {**r.layout.unflatten(t), **bufs}, (x,)).square().sum()
        )

    t = theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(loss_ref(t), t, create_graph=True)
    (expected,) = torch.autograd.grad(g, t, v)
    torch.testing.assert_close(hvp(loss, theta, v), expected)


def test_gnvp_is_jt_h_j_v() -> None:
    _, _, theta, ours, ref = _setup()
    target = torch.randint(0, 3, (4,))

    def loss_of_out(out: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, target)

    jac = torch.func.jacrev(ref)(theta).reshape(-1, theta.numel())
    out = ref(theta)
    h_out = torch.func.hessian(lambda o: loss_of_out(o.reshape(out.shape)))(out.reshape(-1))
    ggn = jac.T @ h_out @ jac
    v, vs = torch.randn_like(theta), torch.randn(3, theta.numel(), dtype=D)
    torch.testing.assert_close(gnvp(ours, loss_of_out, theta, v), ggn @ v)
    torch.testing.assert_close(gnvp(ours, loss_of_out, theta, vs), vs @ ggn.T)


def test_jacobian_is_the_ntk_building_block() -> None:
    _, _, theta, ours, ref = _setup()
    jac = jacobian(ours, theta)
    torch.testing.assert_close(jac, torch.func.jacrev(ref)(theta))
    assert jac.shape == (4, 3, theta.numel())


def test_per_example_grads_match_a_loop() -> None:
    r, x, theta, _, _ = _setup()
    y = torch.randint(0, 3, (4,))

    def loss(t: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(r(xi[None], flat_param=t), yi[None])

    grads = per_example_grads(loss, theta, x, y)
    assert grads.shape == (4, theta.numel())
    for i in range(4):
        t = theta.clone().requires_grad_()
        (g,) = torch.autograd.grad(loss(t, x[i], y[i]), t)
        torch.testing.assert_close(grads[i], g)
    per_layer = r.layout.unflatten(grads)["0.weight"]  # (batch, 7, 5): one layer's share
    assert per_layer.shape == (4, 7, 5)


def test_derivative_helpers_validate_their_inputs() -> None:
    _, _, theta, ours, _ = _setup()
    n = theta.numel()
    with pytest.raises(
        ValueError, match=re.escape(f"vectors must have shape ({n},) or (k, {n}), got (3,)")
    ):
        hvp(lambda t: ours(t).sum(), theta, torch.zeros(3, dtype=D))
    with pytest.raises(
        ValueError, match=re.escape("loss_fn must return a scalar tensor, got (4, 3)")
    ):
        hvp(ours, theta, torch.zeros(n, dtype=D))
    with pytest.raises(ValueError, match=re.escape(f"the Hessian of {n:,} parameters needs")):
        hessian(lambda t: ours(t).sum(), theta, max_params=10)
    with pytest.raises(ValueError, match="flat_param must be a 1-D tensor"):
        jacobian(ours, theta[None])


def test_derivative_helpers_check_their_vector() -> None:
    with pytest.raises(ValueError, match="flat_param must be a 1-D tensor"):
        hessian(lambda t: t.sum(), [1.0, 2.0])  # type: ignore[arg-type]
    theta = torch.ones(3)  # no grad, create_graph=True: still computed
    assert (
        hvp(lambda t: (t**2).sum(), theta, torch.ones(3), create_graph=True).tolist() == [2.0] * 3
    )


def test_helpers_work_with_any_function_of_a_vector() -> None:
    lin = nn.Linear(2, 1).double()
    assert (
        hvp(lambda t: (t**2).sum(), torch.ones(3, dtype=D), torch.ones(3, dtype=D)).tolist()
        == [2.0] * 3
    )
    assert jacobian(lambda t: 3 * t, torch.ones(2, dtype=D)).tolist() == [[3.0, 0.0], [0.0, 3.0]]
    assert isinstance(lin, nn.Module)
