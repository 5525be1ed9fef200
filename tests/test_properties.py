"""Property tests over randomly built architectures, against torch.func.functional_call."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import unchanged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from torchreparam import ReparamModule

EXAMPLES = 200 if os.environ.get("TORCHREPARAM_SLOW") else 25
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def architectures(draw: st.DrawFn) -> tuple[nn.Module, int, torch.dtype, bool]:
    """A random stack of Linear / BatchNorm / nested blocks, with shared layers, tied weights
    and frozen layers. Returns (module, input width, dtype, has_frozen)."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    width = draw(st.integers(1, 5))
    layers: list[nn.Module] = []
    linears: list[nn.Linear] = []
    has_frozen = False
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["linear", "linear", "bn", "nested", "shared", "tied"]))
        if kind == "bn":
            bn = nn.BatchNorm1d(width, affine=draw(st.booleans()))
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            layers.append(bn)
            continue
        same = [lin for lin in linears if lin.in_features == lin.out_features == width]
        if kind == "shared" and same:
            layers += [same[0], nn.Tanh()]  # one module used twice
            continue
        out = width if kind in ("tied", "shared") else draw(st.integers(1, 5))
        lin = nn.Linear(width, out, bias=draw(st.booleans()))
        if kind == "tied" and same:
            lin.weight = same[0].weight  # one parameter in two modules
        if draw(st.integers(0, 5)) == 0:
            lin.requires_grad_(False)
            has_frozen = True
        linears.append(lin)
        block: nn.Module = nn.Sequential(lin, nn.Tanh()) if kind == "nested" else lin
        layers += [block, nn.Tanh()]
        width = out
    return (
        nn.Sequential(*layers).to(dtype),
        layers[0].weight.shape[1] if isinstance(layers[0], nn.Linear) else _input_width(layers),
        dtype,
        has_frozen,
    )


def _input_width(layers: list[nn.Module]) -> int:
    first = layers[0]
    if isinstance(first, nn.BatchNorm1d):
        return first.num_features
    if isinstance(first, nn.Sequential):
        return first[0].in_features  # type: ignore[no-any-return]
    return first.in_features  # type: ignore[no-any-return,attr-defined]


@SETTINGS
@given(arch=architectures(), train=st.booleans(), batch=st.integers(2, 4), data=st.data())
def test_random_architectures_match_functional_call(arch, train: bool, batch: int, data) -> None:  # type: ignore[no-untyped-def]
    net, width, dtype, _ = arch
    net.train(train)
    twin = copy.deepcopy(net)
    flags = {p.requires_grad for p in net.parameters()}
    include = "trainable" if len(flags) > 1 else None  # mixed: keep the frozen ones out
    selected = [p for p in twin.parameters() if include is None or p.requires_grad]
    r = ReparamModule(net, include=include)
    x = torch.randn(batch, width, dtype=dtype)
    # own weights: the plain call, bit for bit
    assert torch.equal(r(x), twin(x))
    # another vector: functional_call on the twin, values and gradients
    scale = data.draw(st.floats(0.1, 2.0))
    theta = (torch.randn(r.param_numel, dtype=dtype) * scale).requires_grad_(
        r.flat_param.requires_grad
    )
    ref = theta.detach().clone().requires_grad_(theta.requires_grad)
    out = r(x, flat_param=theta)
    expected = torch.func.functional_call(twin, r.layout.unflatten(ref), (x,))
    assert torch.equal(out, expected)
    if theta.requires_grad and r.param_numel:
        cot = torch.randn_like(out)
        (g,) = torch.autograd.grad(out, theta, cot, allow_unused=True, materialize_grads=True)
        (h,) = torch.autograd.grad(expected, ref, cot, allow_unused=True, materialize_grads=True)
        torch.testing.assert_close(g, h)
    # the layout contract
    if selected:
        assert torch.equal(r.flat_param, torch.cat([p.reshape(-1) for p in selected]))


bad_values = st.one_of(
    st.tuples(st.just("shape"), st.integers(-3, 3).filter(lambda d: d != 0)),
    st.tuples(st.just("rank"), st.integers(3, 4)),
    st.tuples(st.just("dtype"), st.sampled_from([torch.float16, torch.int64, torch.bool])),
    st.tuples(st.just("type"), st.sampled_from([None, 1.5, "theta", [1.0]])),
)


@SETTINGS
@given(arch=architectures(), bad=bad_values)
def test_random_bad_vectors_raise_before_any_change(arch, bad) -> None:  # type: ignore[no-untyped-def]
    net, width, dtype, has_frozen = arch
    if has_frozen:
        return  # covered above; here the default wrapping must succeed
    net.eval()
    r = ReparamModule(net)
    x = torch.randn(2, width, dtype=dtype)
    n = r.param_numel
    kind, value = bad
    if kind == "shape":
        theta: object = torch.zeros(max(n + value, 0), dtype=dtype)
        if n + value < 0 or n + value == n:
            theta = torch.zeros(n + 1, dtype=dtype)
    elif kind == "rank":
        theta = torch.zeros((1,) * (value - 1) + (n,), dtype=dtype)
    elif kind == "dtype":
        theta = torch.zeros(n, dtype=value)
    else:
        theta = value
    expected = TypeError if kind in ("dtype", "type") else ValueError
    if kind == "type" and theta is None:
        return  # None means "the module's own vector": a valid call
    with unchanged(r, x), pytest.raises(expected, match="flat_param"):
        r(x, flat_param=theta)
