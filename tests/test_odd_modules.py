"""Clear answers for odd modules: no parameters, lazy, mixed dtypes/devices, frozen, complex."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import mlp, reference
from torch import nn
from torch.utils.checkpoint import checkpoint

from torchreparam import ReparamModule


def test_module_without_parameters() -> None:
    r = ReparamModule(nn.ReLU())
    x = torch.randn(3)
    assert r.param_numel == 0
    assert r.flat_param.shape == (0,)
    assert torch.equal(r(x), torch.relu(x))
    assert torch.equal(r(x, flat_param=torch.zeros(0)), torch.relu(x))


def test_module_with_only_buffers() -> None:
    net = nn.BatchNorm1d(3, affine=False)
    r = ReparamModule(net)
    x = torch.randn(4, 3)
    twin = copy.deepcopy(net)
    assert torch.equal(r(x), twin(x))
    assert list(r.state_dict()) == [
        "flat_param",
        "module.running_mean",
        "module.running_var",
        "module.num_batches_tracked",
    ]


def test_lazy_module_is_refused_until_initialized() -> None:
    net = nn.Sequential(nn.LazyLinear(3))
    message = (
        "module has uninitialized lazy parameters (0.bias, 0.weight); run one forward pass "
        "with an example input before wrapping, so that their shapes are known"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        ReparamModule(net)
    assert isinstance(net[0], nn.LazyLinear)  # untouched
    net(torch.randn(2, 4))
    r = ReparamModule(net)
    assert r.param_numel == 15


def test_mixed_dtypes_are_refused_clearly() -> None:
    net = mlp()
    net[2].double()
    with pytest.raises(
        ValueError,
        match=re.escape(
            "parameters must share one dtype to live in one flat vector, got ['torch.float32', 'torch.float64']"
        ),
    ):
        ReparamModule(net)
    r = ReparamModule(net, include=lambda name, p: p.dtype == torch.float32)  # or choose a subset
    assert r.layout.names == ("0.weight", "0.bias")


def test_mixed_devices_are_refused_clearly() -> None:
    net = mlp()
    net[2].to("meta")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "parameters must be on one device to live in one flat vector, got ['cpu', 'meta']"
        ),
    ):
        ReparamModule(net)


def test_frozen_parameters_are_never_made_trainable_silently() -> None:
    net = mlp()
    net[0].requires_grad_(False)
    twin = copy.deepcopy(net)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "module has trainable and frozen (requires_grad=False) parameters; frozen: ['0.weight', '0.bias']"
        ),
    ):
        ReparamModule(net)
    assert isinstance(net[0].weight, nn.Parameter)  # untouched by the refusal
    r = ReparamModule(net, include="trainable")
    assert r.layout.names == ("2.weight", "2.bias")
    params = dict(r.named_parameters())
    assert list(params) == ["flat_param", "module.0.weight", "module.0.bias"]
    assert not params["module.0.weight"].requires_grad
    x = torch.randn(4, 5)
    theta = torch.randn(r.param_numel, requires_grad=True)
    out = r(x, flat_param=theta)
    assert torch.equal(out, torch.func.functional_call(twin, r.layout.unflatten(theta), (x,)))
    out.sum().backward()
    assert net[0].weight.grad is None
    assert theta.grad is not None
    assert list(r.module.state_dict()) == list(twin.state_dict())


def test_all_frozen_gives_a_frozen_flat_param() -> None:
    net = mlp().requires_grad_(False)
    r = ReparamModule(net)
    assert not r.flat_param.requires_grad
    assert not r(torch.randn(2, 5)).requires_grad


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature:UserWarning")  # torch's
def test_complex_parameters() -> None:
    net = nn.Linear(3, 2).to(torch.complex64)
    twin = copy.deepcopy(net)
    r = ReparamModule(net)
    x = torch.randn(4, 3, dtype=torch.complex64)
    assert r.flat_param.dtype == torch.complex64
    assert torch.equal(r(x), twin(x))
    theta = torch.randn(r.param_numel, dtype=torch.complex64)
    assert torch.equal(r(x, flat_param=theta), reference(twin, r.layout, theta, (x,)))


def test_scalar_parameters() -> None:
    class Tempered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.temperature = nn.Parameter(torch.tensor(2.0))  # 0-d
            self.lin = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) / self.temperature

    net = Tempered()
    twin = copy.deepcopy(net)
    r = ReparamModule(net)
    x = torch.randn(3, 2)
    assert r.layout["temperature"].shape == ()
    assert r.module.temperature.shape == ()
    theta = torch.randn(r.param_numel, requires_grad=True)
    out = r(x, flat_param=theta)
    assert torch.equal(out, reference(twin, r.layout, theta, (x,)))
    out.sum().backward()
    assert theta.grad[0] != 0
    assert r(x, flat_param=torch.randn(2, r.param_numel)).shape == (2, 3, 2)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op:UserWarning")
def test_zero_sized_parameters_keep_their_shapes() -> None:
    net = nn.Sequential(nn.Linear(3, 0), nn.Linear(0, 2))
    twin = copy.deepcopy(net)
    r = ReparamModule(net)
    x = torch.randn(4, 3)
    assert r.module[0].weight.shape == (0, 3)
    theta = torch.randn(r.param_numel, requires_grad=True)
    out = r(x, flat_param=theta)
    assert torch.equal(out, reference(twin, r.layout, theta, (x,)))
    out.sum().backward()
    assert theta.grad.shape == (2,)


def _plain_copy_grad(twin: nn.Module, layout, theta: torch.Tensor, *args) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The reference: a plain copy holding theta's values; its parameter grads, concatenated."""
    plain = copy.deepcopy(twin)
    with torch.no_grad():
        for p, v in zip(plain.parameters(), layout.unflatten(theta.detach()).values(), strict=True):
            p.copy_(v)
    plain(*args).square().sum().backward()
    return torch.cat([p.grad.to_dense().reshape(-1) for p in plain.parameters()])


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.a, self.b, self.reentrant = nn.Linear(3, 3), nn.Linear(3, 3), reentrant

    def inner(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.a(h)) * self.a.weight.sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(checkpoint(self.inner, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_recomputation_uses_the_callers_vector(reentrant: bool) -> None:
    net = Checkpointed(reentrant)
    twin = copy.deepcopy(net)
    r = ReparamModule(net)
    x = torch.randn(2, 3, requires_grad=True)
    theta = (5 * torch.randn(r.param_numel)).requires_grad_()  # far from the module's own
    r(x, flat_param=theta).square().sum().backward()
    torch.testing.assert_close(theta.grad, _plain_copy_grad(twin, r.layout, theta, x))
    assert r.flat_param.grad is None  # nothing leaked into the module's own vector
    r.zero_grad()
    r(x).square().sum().backward()  # own weights: the plain module's gradient
    torch.testing.assert_close(r.flat_param.grad, _plain_copy_grad(twin, r.layout, r.flat_param, x))


class CheckpointedClosure(nn.Module):
    """A checkpoint of a closure over the submodules (recomputed after the call returns)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(checkpoint(lambda h: torch.tanh(self.a(h)), x, use_reentrant=False))


@pytest.mark.parametrize("how", ["pure", "wrapper_in_block", "buffers_in_block"])
def test_checkpoint_recomputation_in_every_binding_path(how: str) -> None:
    net = CheckpointedClosure()
    twin = copy.deepcopy(net)
    r = ReparamModule(net)
    x = torch.randn(2, 3)
    theta = (5 * torch.randn(r.param_numel)).requires_grad_()
    if how == "pure":
        out = r.pure(x, flat_param=theta)[0]
    else:
        with r.unflattened_param(theta):
            if how == "wrapper_in_block":
                out = r(x)
            else:
                with r.replaced_buffers(()):
                    out = r.module(x)
    out.square().sum().backward()  # after the blocks: recomputation runs here
    torch.testing.assert_close(theta.grad, _plain_copy_grad(twin, r.layout, theta, x))


def test_sparse_embedding_gives_a_dense_flat_gradient() -> None:
    net = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Linear(3, 2))
    twin = copy.deepcopy(net)
    r = ReparamModule(net)
    idx = torch.randint(0, 10, (5,))
    theta = torch.randn(r.param_numel, requires_grad=True)
    r(idx, flat_param=theta).square().sum().backward()  # the original failed here
    assert not theta.grad.is_sparse
    torch.testing.assert_close(theta.grad, _plain_copy_grad(twin, r.layout, theta, idx))


def test_modules_that_ask_their_parameters_for_device_and_dtype() -> None:
    class AsksDevice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = next(self.parameters())  # Hugging Face's .device/.dtype do this
            return self.lin(x.to(p.device, p.dtype))

    net = AsksDevice()
    twin = copy.deepcopy(net)
    r = ReparamModule(net)
    x = torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(r(x), twin(x))
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in twin.named_parameters()]
    assert tuple(r.parameters()) == (r.flat_param,)  # the wrapper still has one parameter


# torch: embedding_renorm_ has no vmap batching rule (a slower fallback, still correct)
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_embedding_max_norm_never_renormalizes_the_callers_vector() -> None:
    net = nn.Sequential(nn.Embedding(10, 3, max_norm=0.5), nn.Linear(3, 2))
    twin = copy.deepcopy(net)
    r = ReparamModule(net)
    idx = torch.randint(0, 10, (6,))
    theta = (3 * torch.randn(r.param_numel)).requires_grad_()
    before, version = theta.detach().clone(), theta._version
    out = r(idx, flat_param=theta)
    assert torch.equal(theta.detach(), before)  # every peer renormalizes it in place
    assert theta._version == version
    out.square().sum().backward()
    torch.testing.assert_close(theta.grad, _plain_copy_grad(twin, r.layout, before, idx))
    for strategy in ("loop", "vmap"):
        r.population_strategy = strategy
        r(idx, flat_param=torch.stack([before, before]))
        assert torch.equal(theta.detach(), before)


def test_embedding_max_norm_with_its_own_weights_behaves_as_plain() -> None:
    net = nn.Sequential(nn.Embedding(10, 3, max_norm=0.5), nn.Linear(3, 2))
    twin = copy.deepcopy(net)
    r = ReparamModule(net)
    idx = torch.randint(0, 10, (6,))
    out, expected = r(idx), twin(idx)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(r.module[0].weight, twin[0].weight)  # renormalized, as plain
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(
        r.flat_param.grad, torch.cat([p.grad.reshape(-1) for p in twin.parameters()])
    )


def test_max_norm_with_fresh_flat_param_and_pure() -> None:
    net = nn.Sequential(nn.Embedding(10, 3, max_norm=0.5), nn.Linear(3, 2))
    r = ReparamModule(net)
    before = r.flat_param.detach().clone()
    torch.manual_seed(3)
    theta = r.fresh_flat_param()
    assert not torch.equal(r.layout.view(theta, "0.weight"), net[0].weight)  # re-drawn
    r.pure(torch.randint(0, 10, (6,)))
    assert torch.equal(r.flat_param, before)  # pure mutates nothing, max_norm included
