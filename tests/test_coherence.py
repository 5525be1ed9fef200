"""The unwrapped module stays coherent with flat_param through steps, moves, copies and saves."""

from __future__ import annotations

import copy
import io
import pickle
import re
from collections import OrderedDict

import pytest
import torch
from conftest import build, convbn, mlp, reference
from torch import nn

from torchreparam import ReparamModule


def _shares_storage(r: ReparamModule) -> bool:
    base = r.flat_param.untyped_storage().data_ptr()
    return all(
        t.untyped_storage().data_ptr() == base
        for t in r.module.state_dict(keep_vars=True).values()
        if t.dtype == r.flat_param.dtype and t.shape != () and t.dim() > 0 and _is_param(r, t)
    )


def _is_param(r: ReparamModule, t: torch.Tensor) -> bool:
    return all(t is not b for b in r.module.buffers())


def _params_of(r: ReparamModule) -> list[torch.Tensor]:
    """The module's parameter views, read through its attributes."""
    out = []
    for entry in r.layout:
        owner, _, name = entry.name.rpartition(".")
        out.append(getattr(r.module.get_submodule(owner), name))
    return out


def _assert_coherent(r: ReparamModule) -> None:
    """Every parameter attribute is a view of flat_param with its current values."""
    flat = r.flat_param
    for entry, view in zip(r.layout, _params_of(r), strict=True):
        assert view.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr(), entry.name
        assert view.dtype == flat.dtype
        assert view.device == flat.device
        assert torch.equal(view.detach(), flat.detach()[entry.slice].view(entry.shape)), entry.name


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_unwrapped_module_keeps_working_with_autograd_after_optimizer_steps(
    optimizer: type,
) -> None:
    r, twin, (x,) = build("convbn")
    opt = optimizer([r.flat_param], lr=0.1)
    twin_opt = optimizer(twin.parameters(), lr=0.1)
    for _ in range(3):
        for model, o in ((r.module, opt), (twin, twin_opt)):
            o.zero_grad()
            model(x).square().mean().backward()  # the original raised "modified inplace" here
            o.step()
    _assert_coherent(r)
    torch.testing.assert_close(r.flat_param, torch.cat([p.reshape(-1) for p in twin.parameters()]))
    torch.testing.assert_close(r(x), twin(x))


def test_fused_adam_on_flat_param() -> None:
    r, _, (x,) = build("mlp")
    opt = torch.optim.Adam([r.flat_param], lr=0.01, fused=True)
    r(x).sum().backward()
    opt.step()
    _assert_coherent(r)


def test_in_place_writes_through_module_attributes_reach_flat_param() -> None:
    r, _, (_x,) = build("mlp")
    with torch.no_grad():
        r.module[0].weight.fill_(0.5)  # as nn.init does after wrapping
    assert torch.all(r.layout.view(r.flat_param, "0.weight") == 0.5)
    nn.init.zeros_(r.module[2].bias)
    assert torch.all(r.layout.view(r.flat_param, "2.bias") == 0)
    _assert_coherent(r)


@pytest.mark.parametrize("convert", ["double", "half", "bfloat16", "to_float64", "to_empty"])
def test_conversions_keep_the_views_on_flat_param(convert: str) -> None:
    r, twin, (x,) = build("convbn")
    if convert == "to_empty":
        r.to_empty(device="cpu")
        with torch.no_grad():
            r.flat_param.copy_(torch.cat([p.reshape(-1) for p in twin.parameters()]))
    elif convert == "to_float64":
        r.to(torch.float64)
    else:
        getattr(r, convert)()
    _assert_coherent(r)
    dtype = r.flat_param.dtype
    if convert in ("double", "to_float64"):
        assert dtype == torch.float64
        twin.double()
        torch.testing.assert_close(r(x.double()), twin(x.double()))
        torch.testing.assert_close(r.module(x.double()), twin(x.double()))


def test_converting_the_unwrapped_module_moves_flat_param_too() -> None:
    r, twin, (x,) = build("mlp")
    assert r.module.double() is r.module
    assert r.flat_param.dtype == torch.float64
    _assert_coherent(r)
    torch.testing.assert_close(r.module(x.double()), twin.double()(x.double()))


def test_layout_dtype_follows_conversions() -> None:
    r = ReparamModule(mlp())
    r.double()
    assert r.layout.dtype == torch.float64
    r.module.half()
    assert r.layout.dtype == torch.float16 == r.flat_param.dtype


def test_deepcopy_is_independent_and_coherent() -> None:
    r, _twin, (x,) = build("convbn")
    r(x, flat_param=torch.randn(r.param_numel))  # leave cached views and a graph around
    c = copy.deepcopy(r)  # the original raised here
    _assert_coherent(c)
    assert torch.equal(c(x), r(x))
    with torch.no_grad():
        c.flat_param.zero_()
    assert not torch.equal(c.module(x), r.module(x))
    assert r.flat_param.abs().sum() > 0
    _assert_coherent(c)
    _assert_coherent(r)


def test_pickle_keeps_the_sharing() -> None:
    r, _, (x,) = build("convbn")
    r.eval()
    c = pickle.loads(pickle.dumps(r))  # the original silently lost the sharing
    _assert_coherent(c)
    assert torch.equal(c(x), r(x))
    with torch.no_grad():
        c.flat_param.add_(1.0)
    _assert_coherent(c)
    assert not torch.equal(c.module(x), r.module(x))


def test_torch_save_load_of_the_whole_wrapper() -> None:
    r, _, (x,) = build("tied")
    buffer = io.BytesIO()
    torch.save(r, buffer)
    buffer.seek(0)
    c = torch.load(buffer, weights_only=False)
    _assert_coherent(c)
    assert torch.equal(c(x), r(x))


def test_state_dict_round_trip_with_weights_only_load() -> None:
    r, _twin, (x,) = build("convbn")
    r(x)  # move the running statistics
    buffer = io.BytesIO()
    torch.save(r.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)  # weights_only=True by default
    assert list(state) == [
        "flat_param",
        "module.1.running_mean",
        "module.1.running_var",
        "module.1.num_batches_tracked",
    ]
    fresh = ReparamModule(convbn())
    fresh.load_state_dict(state)
    for model in (r, fresh):
        model.eval()
    assert torch.equal(fresh(x), r(x))
    _assert_coherent(fresh)


def test_load_state_dict_of_the_unwrapped_module() -> None:
    r, _, (x,) = build("convbn")
    trained = convbn()
    trained(x)  # running statistics move
    r.load_state_dict(trained.state_dict())
    r.eval()
    trained.eval()
    assert torch.equal(r(x), trained(x))
    _assert_coherent(r)


def test_load_state_dict_of_a_model_with_tied_weights_under_either_name() -> None:
    r, twin, (x,) = build("tied")
    other = type(twin)()
    state = other.state_dict()
    assert "out.weight" in state  # a plain state dict lists the tied weight twice
    r.load_state_dict(state)
    assert torch.equal(r(x), other(x))
    del state["emb.weight"]
    r2, _, _ = build("tied")
    r2.load_state_dict(state)  # the alias alone is enough
    assert torch.equal(r2(x), other(x))


def test_module_state_dict_keeps_original_keys_order_and_values() -> None:
    r, twin, (x,) = build("convbn")
    r(x)
    twin(x)
    mine, theirs = r.module.state_dict(), twin.state_dict()
    assert list(mine) == list(theirs)
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=0, atol=0)
        assert not mine[key].requires_grad
    plain = convbn()  # someone who never heard of torchreparam can load it
    plain.load_state_dict(mine)


def test_module_load_state_dict_with_original_keys() -> None:
    r, _, (x,) = build("convbn")
    other = convbn()
    r.module.load_state_dict(other.state_dict())
    r.eval()
    other.eval()
    assert torch.equal(r.module(x), other(x))
    _assert_coherent(r)
    partial = other.state_dict()
    del partial["0.weight"]
    with pytest.raises(RuntimeError, match=re.escape('Missing key(s) in state_dict: "0.weight"')):
        r.module.load_state_dict(partial)


def test_wrapper_inside_a_bigger_model_saves_and_loads() -> None:
    r, _, (x,) = build("mlp")
    big = nn.Sequential(OrderedDict(body=r, head=nn.Linear(3, 2)))
    state = big.state_dict()
    assert list(state) == ["body.flat_param", "head.weight", "head.bias"]
    copy_big = nn.Sequential(OrderedDict(body=ReparamModule(mlp()), head=nn.Linear(3, 2)))
    copy_big.load_state_dict(state)
    assert torch.equal(copy_big(x), big(x))


def test_state_dict_and_views_inside_a_binding_are_the_modules_own() -> None:
    r, twin, (_x,) = build("mlp")
    with r.unflattened_param(torch.zeros(r.param_numel)):
        state = r.module.state_dict()
    assert torch.equal(state["0.weight"], twin[0].weight)


def test_gradients_flow_after_flat_param_is_replaced() -> None:
    r, _, (x,) = build("mlp")
    r.flat_param = nn.Parameter(r.flat_param.detach() * 2)
    _assert_coherent(r)
    r.module(x).sum().backward()
    assert r.flat_param.grad is not None


def test_theta_passed_in_is_never_modified() -> None:
    r, _, (x,) = build("convbn")
    theta = torch.randn(r.param_numel)
    before = theta.clone()
    r(x, flat_param=theta).sum()
    assert torch.equal(theta, before)
    assert theta._version == 0


def test_reference_helper_is_independent() -> None:
    r, twin, (x,) = build("mlp")  # guards the guard: the twin is a real, separate module
    assert all(p.data_ptr() != r.flat_param.data_ptr() for p in twin.parameters())
    theta = torch.randn(r.param_numel)
    assert torch.equal(reference(twin, r.layout, theta, (x,)), r(x, flat_param=theta))
