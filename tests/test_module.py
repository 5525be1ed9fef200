"""ReparamModule's original surface, checked against the plain module and functional_call."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import MODELS, KwModel, assert_same_state, build, convbn, mlp, reference, snapshot
from torch import nn

from torchreparam import ReparamModule


@pytest.mark.parametrize("name", list(MODELS))
def test_original_surface(name: str) -> None:
    r, twin, _args = build(name)
    assert tuple(r.parameters()) == (r.flat_param,)
    assert r.param_numel == r.flat_param.numel() == sum(p.numel() for p in twin.parameters())
    assert torch.equal(r.flat_param, torch.cat([p.reshape(-1) for p in twin.parameters()]))
    assert r.flat_param.requires_grad
    assert isinstance(r.module, type(twin))


@pytest.mark.parametrize("name", list(MODELS))
def test_own_weights_call_is_the_plain_call(name: str) -> None:
    r, twin, args = build(name)
    expected = twin(*args)
    assert torch.equal(r(*args), expected)
    twin(*args)  # keep the twin's running statistics in step with the module's
    assert torch.equal(r.module(*args), expected)
    # The module shares storage with flat_param.
    first = next(iter(r.layout))
    view = _get(r.module, first.name)
    assert view.data_ptr() == r.flat_param.data_ptr()


def _get(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner), attr)


@pytest.mark.parametrize("name", list(MODELS))
def test_other_vector_matches_functional_call(name: str) -> None:
    r, twin, args = build(name)
    theta = torch.randn(r.param_numel, requires_grad=True)
    ref_theta = theta.detach().clone().requires_grad_()
    out = r(*args, flat_param=theta)
    expected = reference(twin, r.layout, ref_theta, args)
    assert torch.equal(out, expected)
    cotangent = torch.randn_like(out)
    (out * cotangent).sum().backward()
    (expected * cotangent).sum().backward()
    torch.testing.assert_close(theta.grad, ref_theta.grad)
    assert r.flat_param.grad is None  # the module's own vector was not involved


@pytest.mark.parametrize("name", ["mlp", "convbn", "tied", "shared_layer"])
def test_gradcheck_and_gradgradcheck(name: str) -> None:
    r, _, args = build(name, torch.float64)
    theta = torch.randn(r.param_numel, dtype=torch.float64, requires_grad=True)

    def f(t: torch.Tensor) -> torch.Tensor:
        return r(*args, flat_param=t)

    assert torch.autograd.gradcheck(f, (theta,))
    assert torch.autograd.gradgradcheck(f, (theta,))


def _maml(call, theta0: torch.Tensor, data, steps: int = 3, lr: float = 0.1) -> torch.Tensor:  # type: ignore[no-untyped-def]
    (xt, yt), (xv, yv) = data
    theta = theta0
    for _ in range(steps):
        loss = F.cross_entropy(call(theta, xt), yt)
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta = theta - lr * g
    return F.cross_entropy(call(theta, xv), yv)


def test_maml_meta_gradient_matches_functional_call() -> None:
    r, twin, _ = build("mlp")
    data = (
        (torch.randn(8, 5), torch.randint(0, 3, (8,))),
        (torch.randn(6, 5), torch.randint(0, 3, (6,))),
    )
    theta0 = r.flat_param.detach().clone().requires_grad_()
    ref0 = theta0.detach().clone().requires_grad_()
    _maml(lambda t, x: r(x, flat_param=t), theta0, data).backward()
    _maml(lambda t, x: reference(twin, r.layout, t, (x,)), ref0, data).backward()
    torch.testing.assert_close(theta0.grad, ref0.grad)
    assert theta0.grad.abs().sum() > 0


def test_keyword_inputs() -> None:
    net = KwModel()
    twin = copy.deepcopy(net)
    r = ReparamModule(net)
    x, shift = torch.randn(4, 5), torch.randn(3)
    theta = torch.randn(r.param_numel)
    assert torch.equal(r(x, scale=2.0, shift=shift), twin(x, scale=2.0, shift=shift))
    assert torch.equal(r(x=x, flat_param=theta), reference(twin, r.layout, theta, (), x=x))
    assert torch.equal(
        r(x, flat_param=theta, scale=0.5),
        torch.func.functional_call(twin, r.layout.unflatten(theta), (x,), {"scale": 0.5}),
    )


def test_unflattened_param_and_replaced_buffers_context_managers() -> None:
    r, twin, (x,) = build("convbn")
    r.eval()
    twin.eval()
    theta = torch.randn(r.param_numel)
    buffers = tuple(b.clone() + 1 for b in twin.buffers())
    names = [n for n, _ in twin.named_buffers()]
    with r.unflattened_param(theta):
        assert torch.equal(r.module(x), reference(twin, r.layout, theta, (x,)))
        assert torch.equal(r(x), r.module(x))  # flat_param=None means "what is bound"
        with r.replaced_buffers(buffers):
            expected = torch.func.functional_call(
                twin, {**r.layout.unflatten(theta), **dict(zip(names, buffers, strict=True))}, (x,)
            )
            assert torch.equal(r.module(x), expected)
        assert torch.equal(r.module(x), reference(twin, r.layout, theta, (x,)))
    assert torch.equal(r.module(x), twin(x))


def test_context_manager_unbinds_when_its_body_raises() -> None:
    r, twin, (x,) = build("mlp")
    with pytest.raises(KeyError), r.unflattened_param(torch.zeros(r.param_numel)):
        raise KeyError("boom")
    assert torch.equal(r.module(x), twin(x))


def test_module_used_alone_trains_flat_param() -> None:
    r, twin, (x,) = build("mlp")
    r.module(x).sum().backward()  # the unwrapped object, called directly
    twin(x).sum().backward()
    expected = torch.cat([p.grad.reshape(-1) for p in twin.parameters()])
    torch.testing.assert_close(r.flat_param.grad, expected)


def test_trace_matches_and_follows_weights_buffers_and_modes() -> None:
    r, twin, (x,) = build("convbn")
    # torch warns that BatchNorm's train-mode batch-size check is data-dependent while tracing
    with pytest.warns(torch.jit.TracerWarning):
        traced = r.trace(x)
    assert traced is r
    assert torch.equal(r(x), twin(x))  # train mode: batch statistics, running stats updated
    assert_buffers_equal(r, twin)
    r.eval()
    twin.eval()
    assert torch.equal(r(x), twin(x))  # eval mode: traced again, uses running statistics
    with torch.no_grad():
        r.flat_param.mul_(0.5)
        for p in twin.parameters():
            p.mul_(0.5)
    assert torch.equal(r(x), twin(x))
    theta = torch.randn(r.param_numel, requires_grad=True)
    out = r(x, flat_param=theta)
    torch.testing.assert_close(out, reference(twin, r.layout, theta, (x,)))
    out.sum().backward()
    assert theta.grad is not None
    assert theta.grad.abs().sum() > 0
    assert len(r._traced.graphs) == 2  # type: ignore[union-attr]


def assert_buffers_equal(r: ReparamModule, twin: nn.Module) -> None:
    for mine, theirs in zip(r.module.buffers(), twin.buffers(), strict=True):
        assert torch.equal(mine, theirs)


def test_trace_gradients_reach_theta_through_second_order() -> None:
    r, twin, (x,) = build("mlp")
    r.trace(x)
    data = ((x, torch.randint(0, 3, (4,))), (torch.randn(3, 5), torch.randint(0, 3, (3,))))
    theta0 = r.flat_param.detach().clone().requires_grad_()
    ref0 = theta0.detach().clone().requires_grad_()
    _maml(lambda t, inp: r(inp, flat_param=t), theta0, data).backward()
    _maml(lambda t, inp: reference(twin, r.layout, t, (inp,)), ref0, data).backward()
    torch.testing.assert_close(theta0.grad, ref0.grad)


def test_nested_call_with_another_vector() -> None:
    class Nested(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.wrapper: ReparamModule | None = None
            self.inner_theta: torch.Tensor | None = None

        def forward(self, x: torch.Tensor, nest: bool = False) -> torch.Tensor:
            before = self.lin(x)
            middle = self.wrapper(x, flat_param=self.inner_theta) if nest else 0.0
            return before + middle + self.lin(x)  # weights after the nested call: still ours

    net = Nested()
    twin = copy.deepcopy(net)
    r = ReparamModule(net)
    x = torch.randn(2, 3)
    t1, t2 = torch.randn(r.param_numel), torch.randn(r.param_numel)
    net.__dict__["wrapper"] = r  # a plain attribute: registering r as a child would make a cycle
    net.inner_theta = t2
    got = r(x, flat_param=t1, nest=True)
    lin1 = torch.func.functional_call(twin.lin, {"weight": t1[:9].view(3, 3), "bias": t1[9:]}, (x,))
    lin2 = torch.func.functional_call(twin.lin, {"weight": t2[:9].view(3, 3), "bias": t2[9:]}, (x,))
    torch.testing.assert_close(got, lin1 + (lin2 + lin2) + lin1)


def test_wrapping_a_conv_net_keeps_running_stat_semantics() -> None:
    r, twin, (x,) = build("convbn")
    theta = torch.randn(r.param_numel)
    r(x, flat_param=theta)  # train mode without buffers: updates the module's own, as plain
    reference(twin, r.layout, theta, (x,))
    assert_buffers_equal(r, twin)


def test_repr_mentions_size() -> None:
    r = ReparamModule(mlp())
    assert "param_numel=66" in repr(r)
    assert "Linear" in repr(r)


def test_flat_param_is_a_leaf_on_the_parameters_device_and_dtype() -> None:
    net = convbn().double()
    r = ReparamModule(net)
    assert r.flat_param.is_leaf
    assert r.flat_param.dtype == torch.float64
    assert r.flat_param.device == torch.device("cpu")


def test_fresh_flat_param_draws_a_new_initialization_and_touches_nothing() -> None:
    r, _, _ = build("convbn")
    before = snapshot(r)
    torch.manual_seed(1)
    theta = r.fresh_flat_param()
    assert_same_state(before, snapshot(r))  # own weights and buffers untouched
    assert not theta.requires_grad
    expected = convbn()  # the same draws, on a plain module
    torch.manual_seed(1)
    for module in expected.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert torch.equal(theta, torch.cat([p.reshape(-1) for p in expected.parameters()]))
    assert not torch.equal(theta, r.flat_param)


def test_hooks_and_compilation_of_the_wrapper_itself_still_run() -> None:
    # The wrapper's __call__ skips nn.Module's call path only when that path has nothing to do.
    r, twin, (x,) = build("mlp")
    theta = torch.randn(r.param_numel)
    expected = reference(twin, r.layout, theta, (x,))
    seen: list[str] = []
    pre = r.register_forward_pre_hook(lambda m, args, kwargs: (args, kwargs), with_kwargs=True)
    post = r.register_forward_hook(lambda m, args, out: out * 2)
    torch.testing.assert_close(r(x, flat_param=theta), 2 * expected)
    pre.remove()
    post.remove()
    glob = nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(type(m).__name__)
    )
    try:
        torch.testing.assert_close(r(x, flat_param=theta), expected)
    finally:
        glob.remove()
    assert seen[-1] == "ReparamModule"
    torch.testing.assert_close(r(x, flat_param=theta), expected)  # and without any
    r.compile(backend="eager", fullgraph=True)
    assert r._compiled_call_impl is not None
    torch.testing.assert_close(r(x, flat_param=theta), expected)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # (checks on shapes: specialized)
def test_jit_trace_of_a_function_that_calls_the_wrapper_with_a_vector() -> None:
    # (the tracer records every op on a tensor; the module's own flat_param must not be one)
    r, twin, (x,) = build("mlp")
    theta = torch.randn(r.param_numel)
    with torch.no_grad():
        traced = torch.jit.trace(lambda inp, t: r(inp, flat_param=t), (x, theta))
        other = torch.randn(r.param_numel)
        torch.testing.assert_close(traced(x, other), reference(twin, r.layout, other, (x,)))
