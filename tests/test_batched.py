"""The written-out batched strategy for MLPs: equal to the loop, or refused, or the loop."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest
import torch
from conftest import unchanged
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.testing import CompileCounter

from torchreparam import ReparamModule, _population_job

Factory = Callable[[], nn.Module]


def _tied() -> nn.Module:
    shared = nn.Linear(6, 6)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), shared, nn.GELU(), shared, nn.Linear(6, 2))


# name -> (module factory, shared input of one member)
CASES: dict[str, tuple[Factory, Callable[[], torch.Tensor]]] = {
    "mlp": (
        lambda: nn.Sequential(
            nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
        ),
        lambda: torch.randn(7, 5),
    ),
    "sequence": (
        lambda: nn.Sequential(nn.Linear(5, 4), nn.SiLU(), nn.Linear(4, 3)),
        lambda: torch.randn(2, 3, 5),
    ),
    "vector": (
        lambda: nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 2)),
        lambda: torch.randn(5),
    ),
    "no_bias": (
        lambda: nn.Sequential(nn.Linear(5, 4, bias=False), nn.LeakyReLU(0.3), nn.Linear(4, 2)),
        lambda: torch.randn(6, 5),
    ),
    "tied": (_tied, lambda: torch.randn(4, 5)),
    "nested_flatten": (
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Sequential(nn.Linear(12, 6), nn.Dropout(0.5).eval(), nn.ELU()),
            nn.Identity(),
            nn.Linear(6, 3),
        ),
        lambda: torch.randn(4, 3, 4),
    ),
    "flatten_inside": (  # Flatten after a Linear: it acts on each member's dimensions
        lambda: nn.Sequential(nn.Linear(4, 3), nn.Flatten(), nn.Linear(6, 2)),
        lambda: torch.randn(5, 2, 4),
    ),
    "single_linear": (lambda: nn.Linear(4, 3), lambda: torch.randn(2, 4)),
}


def _wrapped(name: str, dtype: torch.dtype = torch.float32) -> tuple[ReparamModule, torch.Tensor]:
    factory, example = CASES[name]
    torch.manual_seed(0)
    module = factory().to(dtype)
    module.eval() if name == "nested_flatten" else None
    return ReparamModule(module), example().to(dtype)


@pytest.fixture
def no_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Population calls must not fall back to the loop (the batched path computes them)."""

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the population fell back to the loop")

    monkeypatch.setattr(_population_job.Job, "loop", fail)


def _loop(
    r: ReparamModule, thetas: torch.Tensor, x: torch.Tensor, per_member: bool
) -> torch.Tensor:
    """The reference: the plain loop of single calls, stacked."""
    rows = x.unbind(0) if per_member else [x] * len(thetas)
    return torch.stack([r(xi, flat_param=t) for xi, t in zip(rows, thetas, strict=True)])


@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per_member"])
@pytest.mark.parametrize("name", list(CASES))
def test_batched_equals_the_loop_in_values_and_gradients(
    name: str, per_member: bool, no_loop: None
) -> None:
    r, x = _wrapped(name)
    r.population_strategy = "batched"
    population = 4
    if per_member:
        x = torch.stack([x + i for i in range(population)])
    x.requires_grad_()
    thetas = (0.5 * torch.randn(population, r.param_numel)).requires_grad_()
    x_ref, thetas_ref = (
        x.detach().clone().requires_grad_(),
        thetas.detach().clone().requires_grad_(),
    )
    out = r(x, flat_param=thetas, in_dims=0 if per_member else None)
    expected = _loop(r, thetas_ref, x_ref, per_member)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)
    cot = torch.randn_like(out)
    (out * cot).sum().backward()
    (expected * cot).sum().backward()
    torch.testing.assert_close(thetas.grad, thetas_ref.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("name", ["mlp", "tied", "flatten_inside"])
def test_batched_passes_gradcheck_and_gradgradcheck(name: str, no_loop: None) -> None:
    r, x = _wrapped(name, torch.float64)
    r.population_strategy = "batched"
    thetas = (0.5 * torch.randn(3, r.param_numel, dtype=torch.float64)).requires_grad_()
    x = x.clone().requires_grad_()

    def f(t: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        return r(inp, flat_param=t)

    assert torch.autograd.gradcheck(f, (thetas, x))
    assert torch.autograd.gradgradcheck(f, (thetas, x))


def test_auto_uses_the_written_out_plan_or_the_loop_never_vmap() -> None:
    r, x = _wrapped("mlp")
    thetas = torch.randn(8, r.param_numel)
    expected = _loop(r, thetas, x, per_member=False)
    for _ in range(2):
        torch.testing.assert_close(r(x, flat_param=thetas), expected)
    assert set(r._plans.values()) <= {"batched", "loop"}  # which one: timing on this machine


def test_strided_vectors_take_the_same_values(no_loop: None) -> None:
    r, x = _wrapped("mlp")
    r.population_strategy = "batched"
    base = torch.randn(r.param_numel, 3)
    for thetas in (base.t(), base[:, 0].expand(3, -1), torch.randn(6, r.param_numel)[::2]):
        torch.testing.assert_close(r(x, flat_param=thetas), _loop(r, thetas, x, per_member=False))


def _planned() -> tuple[ReparamModule, torch.Tensor, torch.Tensor]:
    """The MLP, strategy "batched", after one population call (its plan is remembered)."""
    r, x = _wrapped("mlp")
    r.population_strategy = "batched"
    thetas = torch.randn(3, r.param_numel)
    r(x, flat_param=thetas)
    return r, x, thetas


def test_changes_to_the_tree_after_a_call_are_seen() -> None:
    r, x, thetas = _planned()
    r.module[1] = nn.Tanh()  # a child replaced: a new plan
    torch.testing.assert_close(r(x, flat_param=thetas), _loop(r, thetas, x, per_member=False))

    handle = r.module[2].register_forward_hook(lambda m, i, o: o * 2)  # a hook: no plan
    with (
        unchanged(r, x),
        pytest.raises(ValueError, match="strategy 'batched' has no plan for this call"),
    ):
        r(x, flat_param=thetas)
    r.population_strategy = "auto"  # honours the hook, through vmap or the loop
    torch.testing.assert_close(r(x, flat_param=thetas), _loop(r, thetas, x, per_member=False))
    handle.remove()

    r.population_strategy = "batched"
    r.module.append(nn.Dropout(0.5))  # train mode: random, per member: no plan
    with pytest.raises(ValueError, match="strategy 'batched' has no plan for this call"):
        r(x, flat_param=thetas)
    r.module[-1].eval()
    torch.testing.assert_close(r(x, flat_param=thetas), _loop(r, thetas, x, per_member=False))


def test_global_hooks_disable_the_plan() -> None:
    r, x, thetas = _planned()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        with pytest.raises(ValueError, match="strategy 'batched' has no plan for this call"):
            r(x, flat_param=thetas)
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "module",
    [
        nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU()),
        nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)),
        nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=-1)),  # not elementwise: dims shift
        nn.Sequential(nn.Linear(4, 4), nn.PReLU()),  # (no rule: F.prelu under vmap)
    ],
    ids=["conv", "batchnorm", "softmax", "prelu"],
)
def test_trees_beyond_the_mlp_take_the_graph_plan(module: nn.Module, no_loop: None) -> None:
    r = ReparamModule(module).eval()
    r.population_strategy = "batched"
    x = torch.randn(2, 2, 5) if isinstance(module[0], nn.Conv1d) else torch.randn(2, 4)
    thetas = torch.randn(3, r.param_numel)
    torch.testing.assert_close(r(x, flat_param=thetas), _loop(r, thetas, x, per_member=False))


def test_parametrized_trees_are_refused_before_anything_changes() -> None:
    r = ReparamModule(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))).eval()
    r.population_strategy = "batched"
    x = torch.randn(2, 4)
    message = "strategy 'batched' has no plan for this call: module '(root)' (ParametrizedLinear) is parametrized"
    with unchanged(r, x), pytest.raises(ValueError, match=re.escape(message)):
        r(x, flat_param=torch.randn(3, r.param_numel))


def test_keyword_inputs_and_frozen_weights_are_refused() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    net[2].bias.requires_grad_(False)
    r = ReparamModule(net, include="trainable")  # the frozen bias is not in the vector
    r.population_strategy = "batched"
    with pytest.raises(ValueError, match="strategy 'batched' has no plan for this call"):
        r(torch.randn(3, 4), flat_param=torch.randn(2, r.param_numel))


def test_inputs_that_do_not_fit_get_the_modules_own_error() -> None:
    r, x = _wrapped("mlp")
    r.population_strategy = "batched"
    thetas = torch.randn(3, r.param_numel)
    for bad in (torch.randn(7, 6), x.double(), torch.tensor(1.0)):
        with unchanged(r, x), pytest.raises(RuntimeError) as ours:
            r(bad, flat_param=thetas)
        with pytest.raises(RuntimeError) as plain:
            r.module(bad)
        assert str(ours.value) == str(plain.value)


def test_autocast_takes_the_loop() -> None:
    r, x = _wrapped("mlp")
    r.population_strategy = "batched"
    thetas = torch.randn(3, r.param_numel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x, flat_param=thetas)
        expected = _loop(r, thetas, x, per_member=False)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)


def test_under_torch_func_transforms() -> None:
    r, x = _wrapped("mlp", torch.float64)  # (float32 rounding differs between kernels)
    thetas = torch.randn(3, r.param_numel, dtype=torch.float64)

    def loss(t: torch.Tensor) -> torch.Tensor:
        return r(x, flat_param=t).square().sum()

    r.population_strategy = "loop"
    expected = torch.func.grad(loss)(thetas)
    r.population_strategy = "batched"
    torch.testing.assert_close(torch.func.grad(loss)(thetas), expected)
    many = torch.randn(2, 3, r.param_numel, dtype=torch.float64)
    torch.testing.assert_close(
        torch.func.vmap(lambda t: r(x, flat_param=t))(many),
        torch.stack([_loop(r, t, x, per_member=False) for t in many]),
    )


def test_dropout_rate_changes_and_odd_attributes() -> None:
    class Tagged(nn.Linear):  # forward inherited; an attribute named like Dropout's rate
        def __init__(self) -> None:
            super().__init__(5, 8)
            self.p = torch.tensor([1.0, 2.0])

    drop = nn.Dropout(0.0)  # train mode, rate 0: the identity, so planned
    r = ReparamModule(nn.Sequential(Tagged(), drop, nn.Linear(8, 3)))
    r.population_strategy = "batched"
    x, thetas = torch.randn(4, 5), torch.randn(3, r.param_numel)
    torch.testing.assert_close(r(x, flat_param=thetas), _loop(r, thetas, x, per_member=False))
    r.module[0].p = torch.tensor([3.0, 4.0])  # (not Dropout's rate: no part of the plan)
    torch.testing.assert_close(r(x, flat_param=thetas), _loop(r, thetas, x, per_member=False))
    drop.p = 0.5  # now random: the remembered plan no longer holds
    with pytest.raises(ValueError, match="strategy 'batched' has no plan for this call"):
        r(x, flat_param=thetas)


def test_compiles_to_one_graph_across_new_vectors() -> None:
    r, x = _wrapped("mlp")
    r.population_strategy = "batched"
    counter = CompileCounter()
    f = torch.compile(lambda t, inp: r(inp, flat_param=t), fullgraph=True, backend=counter)
    for _ in range(3):
        thetas = torch.randn(5, r.param_numel)
        torch.testing.assert_close(f(thetas, x), _loop(r, thetas, x, per_member=False))
    assert counter.frame_count == 1


ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Identity, nn.Softplus]


@st.composite
def mlps(draw: st.DrawFn) -> tuple[nn.Module, int]:
    """A random Sequential MLP: widths, biases, activations, a module used twice, a tied
    weight, inactive Dropout, nesting."""
    first = width = draw(st.integers(1, 5))
    layers: list[nn.Module] = []
    squares: list[nn.Linear] = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["linear", "linear", "shared", "tied", "dropout"]))
        if kind == "shared" and squares and squares[0].in_features == width:
            layers.append(squares[0])
        elif kind == "tied" and squares and squares[0].in_features == width:
            lin = nn.Linear(width, width, bias=draw(st.booleans()))
            lin.weight = squares[0].weight
            layers.append(lin)
        elif kind == "dropout":
            layers.append(nn.Dropout(0.5).eval())
        else:
            out = draw(st.integers(1, 5))
            lin = nn.Linear(width, out, bias=draw(st.booleans()))
            squares += [lin] if width == out else []
            layers.append(lin)
            width = out
        layers.append(draw(st.sampled_from(ACTIVATIONS))())
    if not any(isinstance(m, nn.Linear) for m in layers):
        layers.append(nn.Linear(width, 2))
    while len(layers) > 2 and draw(st.booleans()):
        i = draw(st.integers(0, len(layers) - 2))
        j = draw(st.integers(i + 1, len(layers)))
        layers[i:j] = [nn.Sequential(*layers[i:j])]
    return nn.Sequential(*layers), first


@settings(max_examples=300 if os.environ.get("TORCHREPARAM_SLOW") else 30, deadline=None)
@given(arch=mlps(), data=st.data())
def test_random_mlps_match_the_loop(arch: tuple[nn.Module, int], data: st.DataObject) -> None:
    module, features = arch
    r = ReparamModule(module.double())
    population = data.draw(st.integers(1, 4), label="population")
    lead = data.draw(st.lists(st.integers(1, 3), max_size=2), label="lead dims")
    per_member = data.draw(st.booleans(), label="per-member inputs")
    x = torch.randn(*([population] if per_member else []), *lead, features, dtype=torch.float64)
    thetas = torch.randn(population, r.param_numel, dtype=torch.float64, requires_grad=True)
    ref = thetas.detach().clone().requires_grad_()
    r.population_strategy = "batched"
    with mock.patch.object(_population_job.Job, "loop", side_effect=AssertionError("the loop ran")):
        out = r(x, flat_param=thetas, in_dims=0 if per_member else None)
    expected = _loop(r, ref, x, per_member)
    torch.testing.assert_close(out, expected)
    cot = torch.randn_like(out)
    (out * cot).sum().backward()
    (expected * cot).sum().backward()
    torch.testing.assert_close(thetas.grad, ref.grad)


class _Doubled(nn.ReLU):  # forward inherited, the call path overridden
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **kwargs) * 2


class _Reversed(nn.Sequential):  # forward inherited; it iterates with __iter__
    def __iter__(self) -> Iterator[nn.Module]:
        return reversed(list(self._modules.values()))  # type: ignore[arg-type]


class _Softmax(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, -1)


def _instance_forward() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    net[1].forward = lambda t: t * 10  # (what patching tools do)
    return net


@pytest.mark.parametrize(
    "factory",
    [
        _instance_forward,
        lambda: nn.Sequential(nn.Linear(3, 4), _Doubled(), nn.Linear(4, 2)),
        lambda: nn.Sequential(nn.ReLU(inplace=True), nn.Linear(3, 2)),
    ],
    ids=["instance_forward", "call_override", "inplace"],
)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_trees_that_look_planned_but_run_otherwise_are_refused(factory: Factory) -> None:
    r = ReparamModule(factory())
    x, thetas = torch.randn(5, 3), torch.randn(3, r.param_numel)
    r.population_strategy = "batched"
    with (
        unchanged(r),
        pytest.raises(ValueError, match="strategy 'batched' has no plan for this call"),
    ):
        r(x, flat_param=thetas)
    r.population_strategy = "auto"
    torch.testing.assert_close(
        r(x.clone(), flat_param=thetas), _loop(r, thetas, x.clone(), per_member=False)
    )


@pytest.mark.parametrize(
    "factory",
    [
        lambda: _Reversed(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)),
        lambda: nn.Sequential(nn.Linear(3, 0), nn.Linear(0, 2)),
    ],
    ids=["iter_override", "empty_linear"],
)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_trees_the_mlp_plan_refuses_are_traced_as_they_run(factory: Factory) -> None:
    r = ReparamModule(factory())  # (the graph follows the overridden __iter__, in its order)
    x, thetas = torch.randn(5, 3), torch.randn(3, r.param_numel)
    r.population_strategy = "batched"
    torch.testing.assert_close(r(x, flat_param=thetas), _loop(r, thetas, x, per_member=False))


def test_remembered_plan_sees_a_patched_forward_and_a_new_class() -> None:
    r, x, thetas = _planned()
    r.module[1].forward = lambda t: t * 10
    with pytest.raises(ValueError, match="strategy 'batched' has no plan for this call"):
        r(x, flat_param=thetas)
    del r.module[1].forward
    r(x, flat_param=thetas)  # planned again
    r.module[1].__class__ = _Softmax  # its forward now: traced through, a softmax
    torch.testing.assert_close(r(x, flat_param=thetas), _loop(r, thetas, x, per_member=False))


def test_output_is_contiguous_and_flatten_subclasses_act_per_member(no_loop: None) -> None:
    class MyFlatten(nn.Flatten):
        pass

    r = ReparamModule(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), MyFlatten(), nn.Linear(6, 2)))
    r.population_strategy = "batched"
    x, thetas = torch.randn(5, 2, 4), torch.randn(3, r.param_numel)
    out = r(x, flat_param=thetas)
    assert out.is_contiguous()
    torch.testing.assert_close(out, _loop(r, thetas, x, per_member=False))
