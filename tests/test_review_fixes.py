"""Regressions found by review: each test failed before its fix."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import build, mlp
from torch import nn
from torch.utils.checkpoint import checkpoint

import torchreparam._call as call_module  # (its snapshot function is counted below)
from torchreparam import ReparamModule, hessian, hvp


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(checkpoint(lambda h: torch.tanh(self.a(h)), x, use_reentrant=False))


def _expected_grad(
    twin: nn.Module, r: ReparamModule, theta: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    plain = copy.deepcopy(twin)
    with torch.no_grad():
        for p, v in zip(
            plain.parameters(), r.layout.unflatten(theta.detach()).values(), strict=True
        ):
            p.copy_(v)
    plain(x).square().sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in plain.parameters()])


@pytest.mark.parametrize("how", ["pure", "wrapper_in_block", "buffers_in_block"])
def test_checkpoint_recomputation_in_every_binding_path(how: str) -> None:
    net = Checkpointed()
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
    torch.testing.assert_close(theta.grad, _expected_grad(twin, r, theta, x))


def test_replaced_buffers_block_spans_optimizer_steps() -> None:
    r, _, (x,) = build("convbn")
    opt = torch.optim.SGD([r.flat_param], lr=0.1)
    buffers = [b.clone() for b in r.module.buffers()]
    with r.replaced_buffers(buffers):
        for _ in range(2):  # the second call failed: views bound before the step went stale
            opt.zero_grad()
            r(x).sum().backward()
            opt.step()
        assert torch.equal(r.module[0].weight, r.layout.view(r.flat_param, "0.weight"))


def test_layout_dtype_follows_conversions() -> None:
    r = ReparamModule(mlp())
    r.double()
    assert r.layout.dtype == torch.float64
    r.module.half()
    assert r.layout.dtype == torch.float16 == r.flat_param.dtype


def test_unwrapped_keys_that_start_with_module_are_not_the_wrappers() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.module(x)

    r, other = ReparamModule(Holder()), Holder()
    r.load_state_dict(other.state_dict())  # keys "module.weight", "module.bias"
    assert torch.equal(r(torch.ones(1, 2)), other(torch.ones(1, 2)))


def test_a_failed_load_does_not_leave_the_module_lenient() -> None:
    r, _, _ = build("mlp")

    def fail(*_: object) -> None:
        raise KeyError("hook")

    handle = r.module[2].register_load_state_dict_post_hook(fail)
    with pytest.raises(KeyError):
        r.load_state_dict(r.state_dict())
    handle.remove()
    partial = mlp().state_dict()
    del partial["0.weight"]
    with pytest.raises(RuntimeError, match=re.escape('Missing key(s) in state_dict: "0.weight"')):
        r.module.load_state_dict(partial)


def test_max_norm_with_fresh_flat_param_and_pure() -> None:
    net = nn.Sequential(nn.Embedding(10, 3, max_norm=0.5), nn.Linear(3, 2))
    r = ReparamModule(net)
    before = r.flat_param.detach().clone()
    torch.manual_seed(3)
    theta = r.fresh_flat_param()
    assert not torch.equal(r.layout.view(theta, "0.weight"), net[0].weight)  # re-drawn
    r.pure(torch.randint(0, 10, (6,)))
    assert torch.equal(r.flat_param, before)  # pure mutates nothing, max_norm included


def test_single_vector_calls_refuse_a_population_clearly() -> None:
    r, _, _ = build("mlp")
    with (
        pytest.raises(
            ValueError,
            match=re.escape("flat_param has shape (2, 66), but this call takes one vector (66,)"),
        ),
        r.unflattened_param(torch.zeros(2, 66)),
    ):
        pass  # pragma: no cover


def test_a_wrap_that_fails_leaves_the_model_as_it_was() -> None:
    class Picky(nn.Linear):
        def __init_subclass__(cls, **kwargs: object) -> None:
            raise TypeError("no subclasses")

    net = nn.Sequential(nn.Linear(2, 2), Picky(2, 2))
    classes = [type(m) for m in net.modules()]
    params = dict(net.named_parameters())
    with pytest.raises(TypeError, match="no subclasses"):
        ReparamModule(net)
    assert [type(m) for m in net.modules()] == classes
    assert dict(net.named_parameters()) == params
    net(torch.randn(1, 2)).sum().backward()  # an ordinary model again


def test_a_population_loop_takes_one_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    r, _, (x,) = build("convbn")
    r.population_strategy = "loop"
    taken = []
    real = call_module.snapshot
    monkeypatch.setattr(call_module, "snapshot", lambda core: taken.append(1) or real(core))
    r(x, flat_param=torch.randn(5, r.param_numel))
    assert len(taken) == 1


def test_a_callers_vector_swapped_in_by_functional_call_is_not_kept() -> None:
    r, _, (x,) = build("mlp")
    theta = torch.randn(r.param_numel)
    torch.func.functional_call(r, {"flat_param": theta}, (x,))
    assert r._core._cache is None or r._core._cache[0] is not theta


def test_derivative_helpers_check_their_vector() -> None:
    with pytest.raises(ValueError, match="flat_param must be a 1-D tensor"):
        hessian(lambda t: t.sum(), [1.0, 2.0])  # type: ignore[arg-type]
    theta = torch.ones(3)  # no grad, create_graph=True: still computed
    assert (
        hvp(lambda t: (t**2).sum(), theta, torch.ones(3), create_graph=True).tolist() == [2.0] * 3
    )
