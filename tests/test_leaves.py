"""The unwrapped module's own parameters (leaves over flat_param's storage): gradients that
arrive through either side, resets of either side, conversions and copies, each against a plain
twin copied before wrapping; misuse refused with the model unchanged."""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
from conftest import unchanged
from torch import Tensor, nn

from torchreparam import ReparamModule


def _pair() -> tuple[ReparamModule, nn.Module, Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    twin = copy.deepcopy(net)
    return ReparamModule(net), twin, torch.randn(5, 4)


def _assert_same(net: nn.Module, twin: nn.Module) -> None:
    for (name, p), q in zip(net.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("step", ["sgd", "adam"])
def test_optimizer_on_the_leaves_with_gradients_from_either_side(step: str) -> None:
    r, twin, x = _pair()
    net = r.module

    def make(ps):  # type: ignore[no-untyped-def]
        if step == "sgd":
            return torch.optim.SGD(ps, lr=0.1, momentum=0.9)
        return torch.optim.Adam(ps, lr=0.05)

    ours, theirs = make(net.parameters()), make(twin.parameters())
    for i in range(4):  # the gradient arrives through the wrapper, then the module, in turn
        ours.zero_grad()
        theirs.zero_grad()
        (r(x) if i % 2 == 0 else net(x)).square().sum().backward()
        twin(x).square().sum().backward()
        _assert_same(net, twin)
        ours.step()
        theirs.step()
    _assert_same(net, twin)
    torch.testing.assert_close(r(x), twin(x), rtol=0, atol=0)


def test_optimizer_on_flat_param_with_gradients_from_either_side() -> None:
    r, twin, x = _pair()
    ours = torch.optim.SGD(r.parameters(), lr=0.1)
    theirs = torch.optim.SGD(twin.parameters(), lr=0.1)
    list(r.module.parameters())  # the leaves exist from here on
    for i in range(4):
        ours.zero_grad()
        theirs.zero_grad()
        (r.module(x) if i % 2 else r(x)).square().sum().backward()
        twin(x).square().sum().backward()
        flat = torch.cat([p.grad.reshape(-1) for p in twin.parameters()])
        torch.testing.assert_close(r.flat_param.grad, flat)
        _assert_same(r.module, twin)
        ours.step()
        theirs.step()
    torch.testing.assert_close(r(x), twin(x), rtol=0, atol=0)


def test_a_reset_on_one_side_holds_for_the_next_accumulation_on_the_other() -> None:
    r, twin, x = _pair()
    net = r.module
    for m in (r, twin):
        m(x).sum().backward()
    for p in net[0].parameters():  # reset one layer's leaves only
        p.grad = None
    for p in twin[0].parameters():
        p.grad = None
    r(x).sum().backward()  # through flat_param: the reset slices start from zero
    twin(x).sum().backward()
    _assert_same(net, twin)
    r.flat_param.grad = None  # the flat side reset: so is every leaf
    for p in twin.parameters():
        p.grad = None
    net(x).sum().backward()
    twin(x).sum().backward()
    _assert_same(net, twin)


def test_zero_grad_of_the_module_clears_flat_param_too() -> None:
    r, twin, x = _pair()
    for m in (r.module, twin):
        m(x).sum().backward()
    r.module.zero_grad()
    assert r.flat_param.grad is None
    r.module(x).sum().backward()
    r.module.zero_grad(set_to_none=False)
    assert torch.count_nonzero(r.flat_param.grad) == 0
    assert all(torch.count_nonzero(p.grad) == 0 for p in r.module.parameters())


def test_conversion_keeps_the_parameter_objects_as_plain_torch_does() -> None:
    r, twin, x = _pair()
    params, plain = list(r.module.parameters()), list(twin.parameters())
    r.module.double()
    twin.double()
    assert [p is q for p, q in zip(r.module.parameters(), params, strict=True)] == [True] * 4
    assert [p is q for p, q in zip(twin.parameters(), plain, strict=True)] == [True] * 4
    ours, theirs = torch.optim.SGD(params, lr=0.1), torch.optim.SGD(plain, lr=0.1)
    for m, opt in ((r.module, ours), (twin, theirs)):
        m(x.double()).sum().backward()
        opt.step()
    _assert_same(r.module, twin)
    torch.testing.assert_close(r(x.double()), twin(x.double()), rtol=0, atol=0)
    assert r.flat_param.dtype == torch.float64


def test_a_scalar_submodule_weight_is_not_converted_alone() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.tensor(2.0))  # 0-d

        def forward(self, x: Tensor) -> Tensor:
            return x * self.s

    r = ReparamModule(nn.Sequential(nn.Linear(2, 2), Scale()))
    x = torch.randn(3, 2)
    with unchanged(r, x), pytest.raises(ValueError, match=re.escape("converting Scale alone")):
        r.module[1].half()


def test_a_module_of_another_wrapped_model_is_refused() -> None:
    r, _, x = _pair()
    other = ReparamModule(nn.Sequential(nn.Linear(8, 3)))
    with unchanged(r, x), pytest.raises(ValueError, match="would live outside flat_param"):
        r.module[1] = other.module[0]  # (in place of the Tanh: its weights are other's)
    r.module[1] = r.module[1]  # a module of this tree placed again: nothing changes
    torch.testing.assert_close(r(x), r.module(x))


def test_slices_of_containers_are_plain_containers_of_the_trees_modules() -> None:
    r, twin, x = _pair()
    ours, theirs = r.module[1:], twin[1:]
    assert type(ours) is nn.Sequential  # built by torch as type(self)(...): not part of the tree
    h = torch.randn(5, 8)
    torch.testing.assert_close(ours(h), theirs(h), rtol=0, atol=0)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theta = torch.randn(r.param_numel)
    with r.unflattened_param(theta):  # its modules still read the bound vector
        torch.testing.assert_close(ours(h), r.module[2](torch.tanh(h)), rtol=0, atol=0)
    torch.testing.assert_close(r.module(x), twin(x), rtol=0, atol=0)


@pytest.mark.parametrize("write", ["data", "set_"])
def test_a_new_shape_is_refused_at_the_write_itself(write: str) -> None:
    r, twin, x = _pair()
    weight = r.module[0].weight
    message = (
        f".{write}{' = t' if write == 'data' else '(t)'} of shape (9, 4) on parameter '0.weight'"
    )
    new = torch.zeros(9, 4)
    write_it = (
        (lambda: setattr(weight, "data", new)) if write == "data" else lambda: weight.set_(new)
    )
    with (
        unchanged(r, x),
        torch.no_grad(),
        pytest.raises(ValueError, match=re.escape(message)) as error,
    ):
        write_it()
    assert "change shapes before wrapping" in str(error.value)
    assert weight.shape == (8, 4)
    assert r.module[0].weight is weight
    with torch.no_grad():  # the same shape: copied into flat_param, as vector_to_parameters
        weight.set_(torch.ones(8, 4))
        twin[0].weight.set_(torch.ones(8, 4))
    torch.testing.assert_close(r(x), twin(x), rtol=0, atol=0)
    torch.testing.assert_close(r.flat_param[:32], torch.ones(32), rtol=0, atol=0)


@pytest.mark.parametrize("order", [1, -1])
def test_optimizer_zero_grad_resets_flat_param_grad_at_once(order: int) -> None:
    r, twin, x = _pair()
    net = r.module
    for m in (net, twin):
        m(x).square().sum().backward()
    firsts = [torch.optim.SGD(list(m[0].parameters())[::order], lr=0.1) for m in (net, twin)]
    for opt in firsts:  # one layer's parameters only: their slices read zero, the rest stays
        opt.zero_grad()
    flat = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in twin.parameters()])  # fmt: skip
    torch.testing.assert_close(r.flat_param.grad, flat, rtol=0, atol=0)
    _assert_same(net, twin)
    alls = [torch.optim.SGD(list(m.parameters())[::order], lr=0.1) for m in (net, twin)]
    for opt in alls:
        opt.zero_grad()
    assert r.flat_param.grad is None  # as every gradient of the twin
    torch.nn.utils.clip_grad_norm_(r.parameters(), 1.0)  # (nothing to clip: none is stale)
    for opt, m in zip(alls, (r, twin), strict=True):  # a step through the other side
        m(x).square().sum().backward()
        opt.step()
    _assert_same(net, twin)
    torch.testing.assert_close(r(x), twin(x), rtol=0, atol=0)


def test_unfreezing_one_parameter_of_a_model_frozen_before_wrapping() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).requires_grad_(False)
    twin = copy.deepcopy(net)
    r, x = ReparamModule(net), torch.randn(5, 4)
    assert not r.flat_param.requires_grad
    for m in (r.module, twin):
        m[0].weight.requires_grad_(True)
    assert [p.requires_grad for p in r.module.parameters()] == [True, False, False, False]
    for m in (r, r.module, twin, twin):  # through the wrapper, then the module
        m(x).square().sum().backward()
    _assert_same(r.module, twin)
    theta = torch.randn(r.param_numel, requires_grad=True)  # calls with a vector: unchanged
    r(x, flat_param=theta).sum().backward()
    assert theta.grad is not None
    assert theta.grad.abs().sum() > 0


def test_copies_and_pickles_of_a_leaf_are_plain_parameters() -> None:
    r, twin, _ = _pair()
    weight, plain = r.module[0].weight, twin[0].weight
    assert isinstance(weight, nn.Parameter)
    assert repr(weight) == repr(plain)
    for copied in (copy.deepcopy(weight), pickle.loads(pickle.dumps(weight))):
        assert type(copied) is nn.Parameter
        assert copied.requires_grad
        torch.testing.assert_close(copied, plain, rtol=0, atol=0)
        with torch.no_grad():
            copied.zero_()
        torch.testing.assert_close(weight, plain, rtol=0, atol=0)  # independent of the model


def _grads_of(loss: Tensor, params: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("caller", ["module", "wrapper", "submodule"])
def test_autograd_grad_reaches_the_leaves_through_every_call(caller: str) -> None:
    # torch.autograd.grad(loss, net.parameters()) as on the twin, whichever way the module ran:
    # the unwrapped module, the wrapper with its own weights, one submodule called on its own
    r, twin, x = _pair()
    net = r.module
    run = {
        "module": lambda m, inp: m(inp),
        "wrapper": lambda m, inp: (r if m is net else m)(inp),
        "submodule": lambda m, inp: m[2](m[1](m[0](inp))),
    }[caller]
    params = list(net.parameters())  # (r(x) reaches the leaves that exist when it runs)
    got = _grads_of(run(net, x).square().sum(), params)
    want = _grads_of(run(twin, x).square().sum(), list(twin.parameters()))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert r.flat_param.grad is None
    assert all(p.grad is None for p in net.parameters())


def test_backward_with_inputs_accumulates_only_what_it_names() -> None:
    r, twin, x = _pair()
    net = r.module
    first = list(net.parameters())[:2]
    net(x).square().sum().backward(inputs=first)
    twin(x).square().sum().backward(inputs=list(twin.parameters())[:2])
    _assert_same(net, twin)
    r(x).square().sum().backward(inputs=[r.flat_param])  # then flat_param alone: all of it
    twin(x).square().sum().backward()
    _assert_same(net, twin)
    torch.testing.assert_close(
        r.flat_param.grad, torch.cat([p.grad.reshape(-1) for p in twin.parameters()])
    )


def test_autograd_grad_of_flat_param_and_the_leaves_at_once() -> None:
    r, twin, x = _pair()
    net = r.module
    got = _grads_of(net(x).square().sum(), [r.flat_param, *net.parameters()])
    want = _grads_of(twin(x).square().sum(), list(twin.parameters()))
    torch.testing.assert_close(got[0], torch.cat([w.reshape(-1) for w in want]))
    for g, w in zip(got[1:], want, strict=True):
        torch.testing.assert_close(g, w)


def test_inside_a_call_weights_read_as_views_outside_as_the_leaves() -> None:
    r, _, x = _pair()
    net = r.module
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(m[0].weight))  # (a hook: outside)
    original = type(net[0]).forward

    def spy(self: nn.Module, inp: Tensor) -> Tensor:
        seen.append(self.weight)
        return original(self, inp)

    type(net[0]).forward = spy  # type: ignore[method-assign]
    try:
        net(x)
    finally:
        type(net[0]).forward = original  # type: ignore[method-assign]
    assert seen[0] is net[0].weight
    assert isinstance(seen[0], nn.Parameter)
    assert seen[1] is not net[0].weight
    assert seen[1].data_ptr() == net[0].weight.data_ptr()


def test_a_new_parent_lists_the_parameters_and_trains_them_as_a_plain_parent() -> None:
    r, twin, x = _pair()
    torch.manual_seed(1)
    head = nn.Linear(3, 2)
    outer, outer_twin = nn.Sequential(r.module, head), nn.Sequential(twin, copy.deepcopy(head))
    names = [n for n, _ in outer.named_parameters()]
    assert names == [n for n, _ in outer_twin.named_parameters()]
    assert all(
        p is q for p, q in zip(list(outer.parameters())[:4], r.module.parameters(), strict=True)
    )
    for model in (outer, outer_twin):  # an optimizer of the parent's parameters() trains net
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    torch.testing.assert_close(outer(x), outer_twin(x), rtol=0, atol=0)
    _assert_same(r.module, twin)


def test_a_parent_of_the_wrapper_lists_flat_param_once() -> None:
    r, _, _ = _pair()
    other, _, _ = _pair()
    both = nn.ModuleList([r, other.module, nn.Linear(2, 2)])  # one wrapper, one unwrapped module
    listed = dict(both.named_parameters())
    assert list(listed) == [
        "0.flat_param",
        "1.0.weight",
        "1.0.bias",
        "1.2.weight",
        "1.2.bias",
        "2.weight",
        "2.bias",
    ]
    assert listed["0.flat_param"] is r.flat_param
    assert [n for n, _ in r.named_parameters()] == ["flat_param"]
    # DDP and FSDP collect each module's own with recurse=False: flat_param alone, on the wrapper
    assert [n for m in r.modules() for n, _ in m.named_parameters(recurse=False)] == ["flat_param"]
    assert [n for n, _ in nn.Sequential(r.module).named_parameters(recurse=False)] == []
    copied = copy.deepcopy(both)  # (copies of the parent: the same lists, of their own tensors)
    assert [n for n, _ in copied.named_parameters()] == list(listed)


def test_a_wrapper_pickles_from_a_script_top_level() -> None:
    # (pickle reads the modules' _parameters from C: at a script's top level no Python frame
    # is two levels up, and the parameters' lookup of its caller must not fail there)
    import subprocess
    import sys

    code = (
        "import pickle, torch\n"
        "from torchreparam import ReparamModule\n"
        "r = ReparamModule(torch.nn.Linear(3, 2))\n"
        "c = pickle.loads(pickle.dumps(r))\n"
        "x = torch.randn(4, 3)\n"
        "assert torch.equal(c(x), r(x))\n"
        "assert torch.equal(pickle.loads(pickle.dumps(r.module))(x), r(x))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_a_parent_that_gains_the_wrapper_lists_flat_param_alone() -> None:
    # (each walk answers for itself: after the wrapper joins the parent, its walks list
    # flat_param, not the leaves as well: an optimizer would step each weight twice)
    r, _, _ = _pair()
    outer = nn.ModuleList([r.module])
    for _ in range(3):
        assert len(list(outer.parameters())) == 4
    outer.append(r)
    for _ in range(3):
        listed = list(outer.parameters())
        assert len(listed) == 1
        assert listed[0] is r.flat_param
    del outer[1]
    assert len(list(outer.parameters())) == 4
