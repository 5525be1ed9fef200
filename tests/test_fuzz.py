"""Fuzzing over random architectures built from the zoo's parts.

``tests/test_properties.py`` fuzzes stacks of Linear and BatchNorm1d with single vectors; this
file goes further: sequence models made of Linear, Conv1d, BatchNorm, LayerNorm, GroupNorm,
attention, LSTM/GRU, parametrizations (weight norm, orthogonal, spectral norm), hooks that read
weights, modules with buffers and an embedding front end, nested at random, with shared
modules, tied weights, frozen parts (``include="trainable"``), in float32 or float64, in train
or eval mode. Each example checks single calls (own weights, another vector, given buffers)
against a plain copy, populations (random size, strategy, per-member inputs and buffers) against
the loop of single calls, and one random bad input (flat_param, buffers, in_dims) against its
documented ``ValueError``/``TypeError``, raised before any change.

``TORCHREPARAM_SLOW=1`` runs ten times as many examples.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.utils import parametrizations
from zoo import one_intra_op_thread  # noqa: F401 (a fixture)

from torchreparam import ReparamModule
from torchreparam._batched import plan
from torchreparam._inject import innermost

SLOW = bool(os.environ.get("TORCHREPARAM_SLOW"))
EXAMPLES = 300 if SLOW else 30
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
pytestmark = [
    pytest.mark.usefixtures("one_intra_op_thread"),
    # torch: no batching rule for some kernels under vmap (a correct fallback, with a warning)
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]


# ---- the parts: modules on (batch, time, features) ---------------------------------------
class Channels(nn.Module):
    """A module on (batch, features, time), applied to (batch, time, features)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.transpose(1, 2)).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(features, 1, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attn(x, x, x, need_weights=False)[0]


class Recurrent(nn.Module):
    def __init__(self, kind: str, features: int, out: int) -> None:
        super().__init__()
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(features, out, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.rnn(x)[0]


class Scaled(nn.Module):
    """A buffer used in forward."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.rand(features) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _reads_weight(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
    return out + module.weight.mean()


@dataclass
class Arch:
    module: nn.Module
    features: int  # input features (or the vocabulary size for an embedding front end)
    tokens: bool  # integer inputs (an embedding front end)
    dtype: torch.dtype
    recurrent: bool
    frozen: bool


PARTS = ["linear", "linear", "layernorm", "conv", "batchnorm", "groupnorm", "attention", "rnn",
         "weight_norm", "orthogonal", "spectral_norm", "hook", "shared", "tied", "buffer"]  # fmt: skip


@st.composite
def architectures(draw: st.DrawFn) -> Arch:
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    tokens = draw(st.booleans())
    width = draw(st.integers(1, 4))
    first = width
    layers: list[nn.Module] = [nn.Embedding(7, width)] if tokens else []
    squares: list[nn.Linear] = []
    recurrent = frozen = False
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(PARTS))
        out = draw(st.integers(1, 4))
        part: nn.Module
        if kind in ("linear", "hook"):
            lin = nn.Linear(width, out, bias=draw(st.booleans()))
            if kind == "hook":
                lin.register_forward_hook(_reads_weight)
            part, width = lin, out
            if lin.in_features == lin.out_features:
                squares.append(lin)
        elif kind == "layernorm" and width > 1:
            # (over one feature, LayerNorm's output is its bias whatever the input, and float32
            # rounding divided by sqrt(eps) makes the gradients of two equal computations differ)
            part = nn.LayerNorm(width, elementwise_affine=draw(st.booleans()))
        elif kind == "conv":
            part, width = (
                Channels(nn.Conv1d(width, out, draw(st.sampled_from([1, 3])), padding="same")),
                out,
            )
        elif kind == "batchnorm":
            bn = nn.BatchNorm1d(width, affine=draw(st.booleans()))
            with torch.no_grad():
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
            part = Channels(bn)
        elif kind == "groupnorm":
            part = Channels(nn.GroupNorm(draw(st.sampled_from([1, width])), width))
        elif kind == "attention":
            part = SelfAttention(width)
        elif kind == "rnn":
            part, width, recurrent = (
                Recurrent(draw(st.sampled_from(["lstm", "gru"])), width, out),
                out,
                True,
            )
        elif kind in ("weight_norm", "orthogonal", "spectral_norm"):
            part = getattr(parametrizations, kind)(nn.Linear(width, out))
            width = out
        elif kind == "shared" and squares and squares[0].in_features == width:
            part = squares[0]  # one module, twice
        elif kind == "tied" and squares and squares[0].in_features == width:
            part = nn.Linear(width, width)
            part.weight = squares[0].weight  # one parameter, two modules
        else:
            part = Scaled(width)
        if draw(st.integers(0, 6)) == 0 and any(True for _ in part.parameters()):
            part.requires_grad_(False)
            frozen = True
        layers += [part, nn.Tanh()]
    # nesting: consecutive layers grouped into containers, at random
    while len(layers) > 2 and draw(st.booleans()):
        i = draw(st.integers(0, len(layers) - 2))
        j = draw(st.integers(i + 1, len(layers)))
        layers[i:j] = [nn.Sequential(*layers[i:j])]
    module = nn.Sequential(*layers).to(dtype)
    frozen = frozen and any(p.requires_grad for p in module.parameters())
    return Arch(module, 7 if tokens else first, tokens, dtype, recurrent, frozen)


def _inputs(arch: Arch, batch: int, seed: int, population: int | None = None) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (*(() if population is None else (population,)), batch, 3)
    if arch.tokens:
        return torch.randint(0, arch.features, shape, generator=g)
    return torch.randn(*shape, arch.features, generator=g, dtype=arch.dtype)


def _wrap(arch: Arch) -> tuple[ReparamModule, nn.Module]:
    twin = copy.deepcopy(arch.module)
    return ReparamModule(arch.module, include="trainable" if arch.frozen else None), twin


def _plain_copy(
    twin: nn.Module, r: ReparamModule, theta: Tensor, buffers: dict[str, Tensor] | None = None
) -> nn.Module:
    plain = copy.deepcopy(twin)
    named = dict(plain.named_parameters(remove_duplicate=False))
    own = dict(plain.named_buffers())
    with torch.no_grad():
        for e in r.layout.entries:
            named[e.name].copy_(theta.detach()[e.slice].view(e.shape))
        for name, value in (buffers or {}).items():
            own[name].copy_(value)
    return plain


def _random_buffers(r: ReparamModule, data: st.DataObject, *batch: int) -> dict[str, Tensor]:
    """Valid buffers for a subset of the module's, by name (positive where variances live)."""
    out = {}
    for name, own in r.module.named_buffers():
        if not data.draw(st.booleans(), label=f"give {name}"):
            continue
        if own.is_floating_point():
            value = torch.rand(*batch, *own.shape, dtype=own.dtype) + 0.5
        else:
            value = torch.randint(0, 5, (*batch, *own.shape), dtype=own.dtype)
        out[name] = value
    return out


def _close(actual: Tensor, expected: Tensor, what: str, loose: bool = False) -> None:
    """``loose``: batched kernels against the loop, in float32, where the two round differently
    and the random models amplify it (normalizations over one or two features, softmax over one
    key): an absolute tolerance relative to the largest value (1e-4 of it), not to each element
    (a gradient of 0.03 beside one of 12 is 1% off after a rounding of 3e-5 of the scale)."""
    tol = {}
    if loose and actual.dtype == torch.float32:
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
        tol = {"rtol": 1e-4, "atol": 1e-4 * scale}
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def _grads(out: Tensor, theta: Tensor, cot: Tensor) -> Tensor:
    if not (theta.requires_grad and out.requires_grad):
        return torch.zeros_like(theta)
    (g,) = torch.autograd.grad(out, theta, cot, allow_unused=True, materialize_grads=True)
    return g


def _plain_grads(out: Tensor, plain: nn.Module, r: ReparamModule, cot: Tensor) -> Tensor:
    named = dict(plain.named_parameters(remove_duplicate=False))
    params = [named[e.name] for e in r.layout.entries]
    if not (params and out.requires_grad and params[0].requires_grad):
        return torch.zeros(r.param_numel, dtype=r.flat_param.dtype)
    grads = torch.autograd.grad(out, params, cot, allow_unused=True, materialize_grads=True)
    return torch.cat([g.reshape(-1) for g in grads])


@SETTINGS
@given(arch=architectures(), train=st.booleans(), data=st.data())
def test_single_calls_match_a_plain_copy(arch: Arch, train: bool, data: st.DataObject) -> None:
    arch.module.train(train)
    r, twin = _wrap(arch)
    x = _inputs(
        arch, data.draw(st.integers(2, 4), label="batch"), seed=data.draw(st.integers(0, 99))
    )
    # own weights: the plain module, bit for bit, state included
    torch.testing.assert_close(r(x), twin(x), rtol=0, atol=0)
    for (k, a), b in zip(r.module.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # another vector, maybe with given buffers: the plain copy's values, gradients, buffers
    scale = data.draw(st.sampled_from([0.05, 0.5, 2.0]), label="scale")
    theta = (r.flat_param.detach() + scale * torch.randn_like(r.flat_param)).requires_grad_(
        r.flat_param.requires_grad
    )
    before, version = theta.detach().clone(), theta._version
    given_buffers = _random_buffers(r, data)
    mine = {k: v.clone() for k, v in given_buffers.items()}
    plain = _plain_copy(twin, r, theta, given_buffers)
    own_state = {k: v.clone() for k, v in r.state_dict().items()}
    out = r(x, flat_param=theta, buffers=mine if given_buffers else None)
    expected = plain(x)
    _close(out, expected, "values vs the plain copy")
    cot = torch.randn_like(out)
    _close(
        _grads(out, theta, cot),
        _plain_grads(expected, plain, r, cot),
        "gradients vs the plain copy",
    )
    assert theta._version == version, "theta was modified in place"
    assert torch.equal(theta.detach(), before), "theta's values changed"
    # buffers: the given ones are updated as the plain copy updates its own (train mode), and
    # the module's own stay as they were; those not given are the module's own, used (and
    # updated) as the plain copy uses its own
    plain_buffers, module_buffers = dict(plain.named_buffers()), dict(r.module.named_buffers())
    for name, value in module_buffers.items():
        if name in mine:
            assert torch.equal(mine[name], plain_buffers[name]), name
            assert torch.equal(value, own_state[f"module.{name}"]), name
        else:
            assert torch.equal(value, plain_buffers[name]), name


@SETTINGS
@given(arch=architectures(), data=st.data())
def test_populations_match_the_loop_of_single_calls(arch: Arch, data: st.DataObject) -> None:
    arch.module.eval()  # (train mode with buffers: tests/test_buffers.py)
    r, _ = _wrap(arch)
    population = data.draw(st.integers(1, 3), label="population")
    strategies = (
        ["loop", "auto"] if arch.recurrent else ["loop", "vmap", "auto"]
    )  # torch: no vmap rule for RNNs
    if plan(r.module, r.layout, {}) is not None:  # a Sequential MLP: written-out batched too
        strategies.append("batched")
    r.population_strategy = data.draw(st.sampled_from(strategies), label="strategy")
    event(f"strategy {r.population_strategy}")
    per_member = data.draw(st.booleans(), label="per-member inputs")
    batch = data.draw(st.integers(2, 3), label="batch")
    x = _inputs(arch, batch, seed=1, population=population if per_member else None)
    thetas = (
        r.flat_param.detach()
        + 0.3 * torch.randn(population, r.param_numel, dtype=r.flat_param.dtype)
    ).requires_grad_(r.flat_param.requires_grad)
    buffers = _random_buffers(
        r, data, *((population,) if data.draw(st.booleans(), label="per-member buffers") else ())
    )
    state = {k: v.clone() for k, v in r.state_dict().items()}
    out = r(x, flat_param=thetas, buffers=buffers or None, in_dims=0 if per_member else None)
    loop = []
    for i in range(population):
        member_buffers = {
            k: v[i] if v.dim() > dict(r.module.named_buffers())[k].dim() else v
            for k, v in buffers.items()
        }
        loop.append(
            r(x[i] if per_member else x, flat_param=thetas[i], buffers=member_buffers or None)
        )
    expected = torch.stack(loop)
    _close(out, expected, "values vs the loop of single calls", loose=True)
    cot = torch.randn_like(out)
    _close(
        _grads(out, thetas, cot),
        _grads(expected, thetas, cot),
        "gradients vs the loop of single calls",
        loose=True,
    )
    for k, v in r.state_dict().items():
        assert torch.equal(v, state[k]), k


def _bad_flat_param(
    r: ReparamModule, data: st.DataObject, population: int | None
) -> tuple[dict[str, Any], type[Exception], str]:
    n, dtype = r.param_numel, r.flat_param.dtype
    lead = () if population is None else (population,)
    kind = data.draw(
        st.sampled_from(["type", "short", "long", "rank", "empty_population", "dtype", "device"]),
        label="bad flat_param",
    )
    if kind == "type":
        return (
            {"flat_param": data.draw(st.sampled_from([1.5, "theta", [0.0] * n]))},
            TypeError,
            "flat_param must be a torch.Tensor",
        )
    if kind in ("short", "long"):
        size = n + (1 if kind == "long" else -1) if n > 0 or kind == "long" else n + 1
        return (
            {"flat_param": torch.zeros(*lead, size, dtype=dtype)},
            ValueError,
            "flat_param has shape",
        )
    if kind == "rank":
        return {"flat_param": torch.zeros(1, 1, n, dtype=dtype)}, ValueError, "flat_param has shape"
    if kind == "empty_population":
        return {"flat_param": torch.zeros(0, n, dtype=dtype)}, ValueError, "population >= 1"
    if kind == "dtype":
        other = data.draw(
            st.sampled_from(
                [
                    t
                    for t in (torch.float16, torch.float32, torch.float64, torch.int64)
                    if t != dtype
                ]
            )
        )
        return {"flat_param": torch.zeros(*lead, n, dtype=other)}, TypeError, "flat_param has dtype"
    return (
        {"flat_param": torch.zeros(*lead, n, dtype=dtype, device="meta")},
        ValueError,
        "flat_param is on meta",
    )


def _bad_buffers(
    r: ReparamModule, data: st.DataObject, population: int | None
) -> tuple[dict[str, Any], type[Exception], str]:
    names = [n for n, _ in r.module.named_buffers()]
    own = dict(r.module.named_buffers())
    kinds = ["type", "count", "unknown"] + (["shape", "dtype", "not_tensor"] if names else [])
    kind = data.draw(st.sampled_from(kinds), label="bad buffers")
    if kind == "type":
        return (
            {"buffers": data.draw(st.sampled_from([3, "bn", 1.5]))},
            TypeError,
            "buffers must be a tuple/list",
        )
    if kind == "count":
        return (
            {"buffers": (torch.zeros(1),) * (len(names) + 1)},
            ValueError,
            f"buffers has {len(names) + 1} entries",
        )
    if kind == "unknown":
        return (
            {"buffers": {"no.such.buffer": torch.zeros(1)}},
            ValueError,
            "buffers has unknown names",
        )
    name = data.draw(st.sampled_from(names), label="buffer")
    mine = own[name]
    if kind == "shape":
        return (
            {"buffers": {name: torch.zeros(*mine.shape, 3, dtype=mine.dtype)}},
            ValueError,
            f"{name}: expected shape",
        )
    if kind == "dtype":
        other = torch.float16 if mine.dtype != torch.float16 else torch.float32
        return (
            {"buffers": {name: torch.zeros(mine.shape, dtype=other)}},
            ValueError,
            f"{name}: expected shape",
        )
    return {"buffers": {name: 1.0}}, TypeError, "buffers has entries that are not tensors"


def _bad_in_dims(
    r: ReparamModule, data: st.DataObject, population: int
) -> tuple[dict[str, Any], type[Exception], str]:
    kind = data.draw(st.sampled_from(["length", "value", "size"]), label="bad in_dims")
    if kind == "length":
        return {"in_dims": (0, None)}, ValueError, "in_dims must be None, 0, or a tuple"
    if kind == "value":
        return {"in_dims": (1,)}, ValueError, "in_dims[0] must be 0 or None"
    return {"in_dims": 0, "x_population": population + 1}, ValueError, "in_dims[0] is 0 but input 0"


@SETTINGS
@given(arch=architectures(), data=st.data())
def test_bad_inputs_raise_before_any_change(arch: Arch, data: st.DataObject) -> None:
    arch.module.train(data.draw(st.booleans(), label="train"))
    r, twin = _wrap(arch)
    population = data.draw(st.sampled_from([None, 2]), label="population")
    target = data.draw(
        st.sampled_from(["flat_param", "buffers"] + (["in_dims"] if population else [])),
        label="bad",
    )
    if target == "flat_param":
        kwargs, error, message = _bad_flat_param(r, data, population)
    elif target == "buffers":
        kwargs, error, message = _bad_buffers(r, data, population)
        kwargs["flat_param"] = r.flat_param.detach().expand(population, -1) if population else None
    else:
        assert population is not None
        kwargs, error, message = _bad_in_dims(r, data, population)
        kwargs["flat_param"] = r.flat_param.detach().expand(population, -1)
    x_population = kwargs.pop("x_population", None)
    x = _inputs(arch, 2, seed=2, population=x_population)
    flat, state = r.flat_param, {k: v.clone() for k, v in r.state_dict().items()}
    with pytest.raises(error, match=re.escape(message)):
        r(x, **kwargs)
    # nothing changed (no deepcopy here: wrapped RNNs cannot be deep-copied yet, see the zoo)
    assert r.flat_param is flat
    for k, v in r.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert innermost(r._core) is None
    # the next call works: the plain module's result
    x = x if x_population is None else x[0]
    torch.testing.assert_close(r(x), twin(x), rtol=0, atol=0)
