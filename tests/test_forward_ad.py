"""Forward-mode AD through the wrapper: ``torch.autograd.forward_ad`` dual vectors and
``torch.func.jvp``, against the same computed through ``torch.func.functional_call`` on the
unwrapped twin (float64)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from conftest import build, reference
from torch import Tensor

from torchreparam import ReparamModule

D = torch.float64
NAMES = ["mlp", "convbn", "tied", "shared_layer"]


def _jvp_reference(twin: torch.nn.Module, r: ReparamModule, x: Any, theta: Tensor, v: Tensor):  # type: ignore[no-untyped-def]
    return torch.func.jvp(lambda t: reference(twin, r.layout, t, (x,)), (theta,), (v,))


def _dual_call(
    call: Callable[[Tensor], Tensor], theta: Tensor, v: Tensor, *, no_grad: bool = False
) -> tuple[Tensor, Tensor | None]:
    """``call(dual(theta, v))``: its value and its tangent."""
    with fwAD.dual_level(), torch.no_grad() if no_grad else nullcontext():
        out = fwAD.unpack_dual(call(fwAD.make_dual(theta, v)))
        tangent = None if out.tangent is None else out.tangent.clone()
        return out.primal.detach().clone(), tangent


def _setup(name: str):  # type: ignore[no-untyped-def]
    r, twin, (x,) = build(name, D)
    r.eval()  # (BatchNorm: the same statistics in every call)
    twin.eval()
    theta = torch.randn(r.param_numel, dtype=D)
    return r, twin, x, theta, torch.randn_like(theta)


@pytest.mark.parametrize("no_grad", [False, True], ids=["grad", "no_grad"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "requires_grad"])
@pytest.mark.parametrize("name", NAMES)
def test_dual_vectors_match_functional_call(name: str, requires_grad: bool, no_grad: bool) -> None:
    """A dual vector (requiring grad or not; under no_grad too, which does not stop forward AD)
    gives the twin's value and tangent: the fast path's autograd.Function has a jvp."""
    r, twin, x, theta, v = _setup(name)
    expected, expected_tangent = _jvp_reference(twin, r, x, theta, v)
    primal = theta.clone().requires_grad_(requires_grad)
    out, tangent = _dual_call(lambda t: r(x, flat_param=t), primal, v, no_grad=no_grad)
    assert tangent is not None  # (a path that skips autograd would drop it silently)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(tangent, expected_tangent)


@pytest.mark.parametrize("no_grad", [False, True], ids=["grad", "no_grad"])
@pytest.mark.parametrize("name", NAMES)
def test_a_dual_of_the_modules_own_weights(name: str, no_grad: bool) -> None:
    """The module's own weights as the primal: passed as flat_param=, and bound in place of
    flat_param by functional_call (which goes through the wrapper's own views)."""
    r, twin, x, _, v = _setup(name)
    own = r.flat_param
    before = own.detach().clone()
    expected, expected_tangent = _jvp_reference(twin, r, x, own.detach(), v)
    calls = {
        "flat_param=": lambda t: r(x, flat_param=t),
        "functional_call": lambda t: torch.func.functional_call(r, {"flat_param": t}, (x,)),
        "unflattened_param": lambda t: _in_block(r, t, x),
    }
    for what, call in calls.items():
        out, tangent = _dual_call(call, own, v, no_grad=no_grad)
        assert tangent is not None, what
        torch.testing.assert_close(out, expected, msg=what)
        torch.testing.assert_close(tangent, expected_tangent, msg=what)
    # torch.func.jvp at the module's own weights
    got = torch.func.jvp(lambda t: r(x, flat_param=t), (own,), (v,))
    torch.testing.assert_close(got[0], expected)
    torch.testing.assert_close(got[1], expected_tangent)
    assert r.flat_param is own
    assert torch.equal(own, before)


def _in_block(r: ReparamModule, theta: Tensor, x: Tensor) -> Tensor:
    with r.unflattened_param(theta):
        return r.module(x)  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", NAMES)
def test_torch_func_jvp_matches_functional_call(name: str) -> None:
    r, twin, x, theta, v = _setup(name)
    got = torch.func.jvp(lambda t: r(x, flat_param=t), (theta,), (v,))
    expected = _jvp_reference(twin, r, x, theta, v)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


@pytest.mark.parametrize("name", NAMES)
def test_forward_over_reverse_hvp_matches_functional_call(name: str) -> None:
    """Hessian-vector products as the jvp of a gradient: torch.func (jvp of grad) and
    torch.autograd (a dual vector through autograd.grad with create_graph=True)."""
    r, twin, x, theta, v = _setup(name)

    def loss(t: Tensor) -> Tensor:
        return r(x, flat_param=t).square().sum()

    def loss_ref(t: Tensor) -> Tensor:
        return reference(twin, r.layout, t, (x,)).square().sum()

    expected = torch.func.jvp(torch.func.grad(loss_ref), (theta,), (v,))[1]
    torch.testing.assert_close(torch.func.jvp(torch.func.grad(loss), (theta,), (v,))[1], expected)
    with fwAD.dual_level():
        dual = fwAD.make_dual(theta.clone().requires_grad_(), v)
        (grad,) = torch.autograd.grad(loss(dual), dual, create_graph=True)
        hvp = fwAD.unpack_dual(grad).tangent
    assert hvp is not None
    torch.testing.assert_close(hvp, expected)


def test_gradcheck_forward_and_forward_over_reverse() -> None:
    r, _, x, theta, _ = _setup("mlp")
    theta.requires_grad_()

    def ours(t: Tensor) -> Tensor:
        return r(x, flat_param=t)

    assert torch.autograd.gradcheck(ours, (theta,), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(ours, (theta,), check_fwd_over_rev=True)


@pytest.mark.parametrize("strategy", ["loop", "vmap", "batched"])
@pytest.mark.parametrize("no_grad", [False, True], ids=["grad", "no_grad"])
def test_a_dual_population_matches_functional_call(strategy: str, no_grad: bool) -> None:
    r, twin, x, _, _ = _setup("mlp")
    r.population_strategy = strategy  # type: ignore[assignment]
    thetas = torch.randn(3, r.param_numel, dtype=D)
    vs = torch.randn_like(thetas)
    expected = [_jvp_reference(twin, r, x, t, v) for t, v in zip(thetas, vs, strict=True)]
    out, tangent = _dual_call(lambda t: r(x, flat_param=t), thetas, vs, no_grad=no_grad)
    assert tangent is not None
    torch.testing.assert_close(out, torch.stack([e[0] for e in expected]))
    torch.testing.assert_close(tangent, torch.stack([e[1] for e in expected]))


def test_a_traced_wrapper_takes_dual_vectors() -> None:
    r, twin, x, theta, v = _setup("mlp")
    r.trace(x)
    expected, expected_tangent = _jvp_reference(twin, r, x, theta, v)
    for requires_grad in (False, True):
        primal = theta.clone().requires_grad_(requires_grad)
        out, tangent = _dual_call(lambda t: r(x, flat_param=t), primal, v)
        assert tangent is not None
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(tangent, expected_tangent)


def test_reverse_mode_is_unchanged_by_the_jvp() -> None:
    """The common path (another vector, no forward AD): the same gradient as the twin's."""
    r, twin, x, theta, _ = _setup("convbn")
    theta.requires_grad_()
    (got,) = torch.autograd.grad(r(x, flat_param=theta).square().sum(), theta)
    (expected,) = torch.autograd.grad(reference(twin, r.layout, theta, (x,)).square().sum(), theta)
    torch.testing.assert_close(got, expected)
