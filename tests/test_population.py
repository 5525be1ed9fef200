"""Populations of flat vectors equal the loop of single calls, by every strategy."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import build, unchanged
from torch import nn
from torch._dynamo.testing import CompileCounter

from torchreparam import ReparamModule

STRATEGIES = ["loop", "vmap", "auto"]


def attention() -> nn.Module:
    return nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)


def _loop_reference(r: ReparamModule, thetas: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
    return torch.stack([r(*args, flat_param=theta) for theta in thetas])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", ["mlp", "convbn", "tied", "attention"])
# torch: its fused encoder-layer kernel has no vmap batching rule (a fallback, still correct)
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_population_equals_the_loop_of_single_calls(name: str, strategy: str) -> None:
    if name == "attention":
        r, args = ReparamModule(attention()), (torch.randn(2, 5, 8),)
    else:
        r, _, args = build(name)
    r.eval()  # (train mode with BatchNorm: see the buffer tests)
    r.population_strategy = strategy
    # torch limitation: under vmap, TransformerEncoderLayer (eval) takes its fused kernel, which
    # has no derivative; "auto" falls back to the loop there (checked by the auto case).
    grads = not (name == "attention" and strategy == "vmap")
    thetas = (0.3 * torch.randn(4, r.param_numel)).requires_grad_(grads)
    ref_thetas = thetas.detach().clone().requires_grad_(grads)
    out = r(*args, flat_param=thetas)
    expected = _loop_reference(r, ref_thetas, *args)
    assert out.shape == (4, *expected.shape[1:])
    torch.testing.assert_close(out, expected)
    if not grads:
        return
    cot = torch.randn_like(out)
    (out * cot).sum().backward()
    (expected * cot).sum().backward()
    torch.testing.assert_close(thetas.grad, ref_thetas.grad)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_per_member_inputs(strategy: str) -> None:
    r, _, _ = build("mlp")
    r.population_strategy = strategy
    thetas = torch.randn(3, r.param_numel)
    xs, shared = torch.randn(3, 4, 5), torch.randn(4, 5)
    out = r(xs, flat_param=thetas, in_dims=(0,))
    torch.testing.assert_close(
        out, torch.stack([r(x, flat_param=t) for x, t in zip(xs, thetas, strict=True)])
    )
    # (under "auto" the two calls may take different strategies: equal up to rounding)
    torch.testing.assert_close(
        r(shared, flat_param=thetas, in_dims=(None,)), r(shared, flat_param=thetas)
    )
    torch.testing.assert_close(r(xs, flat_param=thetas, in_dims=0), out)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_auto_checks_that_vmap_can_also_go_backward() -> None:
    # Under vmap, TransformerEncoderLayer (eval) runs a fused kernel without a derivative: the
    # forward works, the backward fails. "auto" must not pick vmap for calls that need grads.
    r = ReparamModule(attention()).eval()
    x = torch.randn(2, 5, 8)
    thetas = (0.3 * torch.randn(4, r.param_numel)).requires_grad_()
    for _ in range(3):
        r(x, flat_param=thetas).sum().backward()
    assert list(r._plans.values()) == ["loop"]


def test_auto_under_compile_picks_a_strategy_without_timing() -> None:
    r, twin, (x,) = build("mlp")
    counter = CompileCounter()
    f = torch.compile(lambda t, inp: r(inp, flat_param=t), fullgraph=True, backend=counter)
    thetas = torch.randn(3, r.param_numel)
    expected = torch.stack(
        [torch.func.functional_call(twin, r.layout.unflatten(t), (x,)) for t in thetas]
    )
    torch.testing.assert_close(f(thetas, x), expected)
    assert counter.frame_count == 1


def test_population_of_one_is_a_single_call() -> None:
    r, _, (x,) = build("convbn")
    theta = torch.randn(r.param_numel)
    r.eval()
    torch.testing.assert_close(r(x, flat_param=theta[None]), r(x, flat_param=theta)[None])


def test_nested_outputs_are_stacked_leaf_by_leaf() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            y = self.lin(x)
            return {"pair": (y, y.sum(-1))}

    r = ReparamModule(TwoHeads())
    thetas, x = torch.randn(5, r.param_numel), torch.randn(4, 3)
    for strategy in STRATEGIES:
        r.population_strategy = strategy
        out = r(x, flat_param=thetas)
        assert out["pair"][0].shape == (5, 4, 2)
        assert out["pair"][1].shape == (5, 4)
        torch.testing.assert_close(out["pair"][1][2], r(x, flat_param=thetas[2])["pair"][1])


def test_auto_remembers_its_choice_per_signature() -> None:
    r, _, (x,) = build("mlp")
    thetas = torch.randn(4, r.param_numel)
    r(x, flat_param=thetas)
    assert len(r._plans) == 1
    assert set(r._plans.values()) <= {"loop", "vmap", "batched"}
    r(x, flat_param=thetas)
    assert len(r._plans) == 1
    r(x, flat_param=torch.randn(6, r.param_numel))
    assert len(r._plans) == 2


def test_population_errors_are_clear_and_change_nothing() -> None:
    r, _, (x,) = build("convbn")
    r.eval()
    thetas = torch.randn(3, r.param_numel)
    with (
        unchanged(r, x),
        pytest.raises(
            ValueError,
            match=re.escape("in_dims[0] is 0 but input 0 is a tensor of shape (2, 3, 5, 5)"),
        ),
    ):
        r(x, flat_param=thetas, in_dims=(0,))
    with (
        unchanged(r, x),
        pytest.raises(
            ValueError,
            match=re.escape(
                "in_dims must be None, 0, or a tuple of 0/None with one entry per positional input (1 here), got (0, 0)"
            ),
        ),
    ):
        r(x, flat_param=thetas, in_dims=(0, 0))
    with (
        unchanged(r, x),
        pytest.raises(ValueError, match=re.escape("in_dims applies to population calls only")),
    ):
        r(x, flat_param=thetas[0], in_dims=0)
    with (
        unchanged(r, x),
        pytest.raises(ValueError, match=re.escape("expected shape (4,) or (3, 4)")),
    ):
        r(x, flat_param=thetas, buffers={"1.running_mean": torch.zeros(2, 4)})
    with unchanged(r, x), pytest.raises(ValueError, match=re.escape("flat_param has shape (3, 7)")):
        r(x, flat_param=torch.zeros(3, 7))
    r.population_strategy = "fastest"  # type: ignore[assignment]
    with unchanged(r, x), pytest.raises(ValueError, match="strategy must be one of"):
        r(x, flat_param=thetas)


def test_exception_inside_vmap_leaves_the_module_intact() -> None:
    r, _, (x,) = build("mlp")
    r.population_strategy = "vmap"

    def explode(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        raise KeyError("inside vmap")

    with unchanged(r, x):
        handle = r.module[2].register_forward_pre_hook(explode)
        with pytest.raises(KeyError):
            r(x, flat_param=torch.randn(3, r.param_numel))
        handle.remove()
    assert not torch._C._are_functorch_transforms_active()


def test_dropout_in_train_mode_draws_per_member_masks() -> None:
    net = nn.Sequential(nn.Linear(5, 50), nn.Dropout(0.5))
    r = ReparamModule(net)
    theta = r.flat_param.detach()
    thetas = theta.expand(2, -1).clone()
    for strategy in ("vmap", "loop"):
        r.population_strategy = strategy
        out = r(torch.ones(1, 5), flat_param=thetas)
        assert not torch.equal(out[0], out[1])  # same weights, different masks


def test_compiled_population_is_one_graph() -> None:
    r, twin, (x,) = build("mlp")
    counter = CompileCounter()
    r.population_strategy = "vmap"
    f = torch.compile(lambda t, inp: r(inp, flat_param=t), fullgraph=True, backend=counter)
    for _ in range(2):
        thetas = torch.randn(3, r.param_numel)
        expected = torch.stack(
            [torch.func.functional_call(twin, r.layout.unflatten(t), (x,)) for t in thetas]
        )
        torch.testing.assert_close(f(thetas, x), expected)
    assert counter.frame_count == 1


def test_population_on_a_copy_is_independent() -> None:
    r, _, (x,) = build("mlp")
    thetas = torch.randn(2, r.param_numel)
    c = copy.deepcopy(r)
    assert torch.equal(c(x, flat_param=thetas), r(x, flat_param=thetas))
