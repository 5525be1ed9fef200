"""Population calls under control: ``population_chunk_size``, ``population_randomness`` and
keyword inputs with their own ``in_dims``. The reference is always the loop of single calls."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from conftest import KwModel, build, unchanged
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from torchreparam import ReparamModule

STRATEGIES = ["loop", "vmap", "auto"]


def _singles(r: ReparamModule, thetas: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return torch.stack([r(*args, flat_param=t, **kwargs) for t in thetas])


@pytest.mark.parametrize("strategy", [*STRATEGIES, "batched"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunks_equal_the_loop_in_values_and_gradients(strategy: str, chunk: int) -> None:
    r, _, (x,) = build("mlp")
    r.population_strategy = strategy  # type: ignore[assignment]
    r.population_chunk_size = chunk
    thetas = (0.5 * torch.randn(8, r.param_numel)).requires_grad_()
    ref = thetas.detach().clone().requires_grad_()
    xs = torch.randn(8, *x.shape)
    for args, in_dims in (((x,), None), ((xs,), 0)):
        out = r(*args, flat_param=thetas, in_dims=in_dims)
        if in_dims is None:
            expected = _singles(r, ref, x)
        else:
            expected = torch.stack([r(a, flat_param=t) for a, t in zip(xs, ref, strict=True)])
        torch.testing.assert_close(out, expected)
        cot = torch.randn_like(out)
        (out * cot).sum().backward()
        (expected * cot).sum().backward()
        torch.testing.assert_close(thetas.grad, ref.grad)
        thetas.grad = ref.grad = None


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> dict[str, Any]:
        y = self.lin(x)
        return {"y": y, "pair": (y.sum(-1), None), "peak": y.abs().max().item()}


def test_chunks_join_nested_outputs_and_per_member_values() -> None:
    r = ReparamModule(Mixed())
    r.population_chunk_size = 2
    thetas, x = torch.randn(5, r.param_numel), torch.randn(4, 3)
    out = r(x, flat_param=thetas)
    singles = [r(x, flat_param=t) for t in thetas]
    torch.testing.assert_close(out["y"], torch.stack([s["y"] for s in singles]))
    torch.testing.assert_close(out["pair"][0], torch.stack([s["pair"][0] for s in singles]))
    assert out["pair"][1] is None
    assert out["peak"] == [s["peak"] for s in singles]


def test_chunks_update_per_member_buffers_as_the_loop() -> None:
    r, _, (x,) = build("convbn")  # train mode: BatchNorm updates each member's statistics
    r.population_chunk_size = 2
    thetas = 0.3 * torch.randn(5, r.param_numel)
    own = [b.clone() for b in r.module.buffers()]
    mine = [b.expand(5, *b.shape).clone() for b in own]
    theirs = [b.clone() for b in mine]
    for strategy in ("vmap", "loop"):
        r.population_strategy = strategy  # type: ignore[assignment]
        out = r(x, flat_param=thetas, buffers=mine)
        expected = torch.stack(
            [r(x, flat_param=t, buffers=[b[i] for b in theirs]) for i, t in enumerate(thetas)]
        )
        torch.testing.assert_close(out, expected)
        for a, b in zip(mine, theirs, strict=True):
            torch.testing.assert_close(a, b)
    assert all(torch.equal(a, b) for a, b in zip(own, r.module.buffers(), strict=True))


class _Largest(TorchDispatchMode):
    """Records the largest tensor any operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor) and func is not torch.ops.aten.cat.default:
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_chunks_bound_the_largest_intermediate_of_a_thousand_members(strategy: str) -> None:
    r = ReparamModule(nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 2)))
    r.population_strategy = strategy  # type: ignore[assignment]
    thetas, x = 0.1 * torch.randn(1000, r.param_numel), torch.randn(16, 8)
    with torch.no_grad():
        whole = r(x, flat_param=thetas)
        r.population_chunk_size = 50
        r(x, flat_param=thetas)  # ("auto": its trials run on the first call of a signature)
        with _Largest() as seen:
            out = r(x, flat_param=thetas)
    torch.testing.assert_close(out, whole)
    hidden = 16 * 256  # one member's hidden activations
    assert seen.numel <= max(50 * hidden, r.param_numel * 50)  # never all 1000 members' at once
    assert hidden <= seen.numel < 1000 * hidden  # (the mode saw the hidden activations)


def _dropout() -> ReparamModule:
    return ReparamModule(nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5), nn.Linear(64, 3)))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("chunk", [None, 2])
def test_randomness_different_draws_a_mask_per_member(strategy: str, chunk: int | None) -> None:
    r = _dropout()
    r.population_strategy = strategy  # type: ignore[assignment]
    r.population_chunk_size = chunk
    assert r.population_randomness == "different"  # the default
    same = r.flat_param.detach().expand(4, -1).clone()
    out = r(torch.ones(2, 4), flat_param=same)
    assert all(not torch.equal(out[0], out[i]) for i in range(1, 4))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("chunk", [None, 3])
def test_randomness_same_draws_the_first_members_mask(strategy: str, chunk: int | None) -> None:
    r = _dropout()
    r.population_strategy = strategy  # type: ignore[assignment]
    r.population_chunk_size = chunk
    r.population_randomness = "same"
    thetas = torch.randn(5, r.param_numel, requires_grad=True)
    x = torch.ones(2, 4)
    torch.manual_seed(3)
    out = r(x, flat_param=thetas)
    after = torch.rand(3)
    expected = []
    for t in thetas:  # each member alone, from the same random state
        torch.manual_seed(3)
        expected.append(r(x, flat_param=t))
    torch.testing.assert_close(out, torch.stack(expected))
    assert torch.equal(after, torch.rand(3))  # the generator moved on as after one member
    grad = torch.autograd.grad(out.sum(), thetas)[0]
    ref = torch.stack([torch.autograd.grad(e.sum(), thetas)[0][i] for i, e in enumerate(expected)])
    torch.testing.assert_close(grad, ref)


def test_randomness_same_under_vmap_masks_every_member_alike() -> None:
    r = _dropout()
    r.population_strategy = "vmap"
    r.population_randomness = "same"
    same = r.flat_param.detach().expand(4, -1).clone()
    out = r(torch.ones(2, 4), flat_param=same)
    assert all(torch.equal(out[0], out[i]) for i in range(1, 4))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("chunk", [None, 2])
def test_keyword_inputs_with_their_own_in_dims(strategy: str, chunk: int | None) -> None:
    r = ReparamModule(KwModel())
    r.population_strategy = strategy  # type: ignore[assignment]
    r.population_chunk_size = chunk
    thetas = torch.randn(5, r.param_numel, requires_grad=True)
    x, xs = torch.randn(4, 5), torch.randn(5, 4, 5)
    shifts = torch.randn(5, 3, requires_grad=True)
    out = r(x, flat_param=thetas, shift=shifts, scale=2.0, in_dims={"shift": 0})
    expected = torch.stack(
        [r(x, flat_param=t, shift=s, scale=2.0) for t, s in zip(thetas, shifts, strict=True)]
    )
    torch.testing.assert_close(out, expected)
    got = torch.autograd.grad(out.square().sum(), (thetas, shifts))
    want = torch.autograd.grad(expected.square().sum(), (thetas, shifts))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    both = r(xs, flat_param=thetas, shift=shifts, in_dims={0: 0, "shift": 0})
    expected = torch.stack(
        [r(a, flat_param=t, shift=s) for a, t, s in zip(xs, thetas, shifts, strict=True)]
    )
    torch.testing.assert_close(both, expected)
    shared = r(x, flat_param=thetas, shift=shifts[0], in_dims={"shift": None})
    torch.testing.assert_close(shared, r(x, flat_param=thetas, shift=shifts[0]))


def test_bad_options_and_in_dims_are_refused_before_anything_changes() -> None:
    r, _, (x,) = build("convbn")
    thetas = torch.randn(3, r.param_numel)
    cases: list[tuple[dict[str, Any], dict[str, Any], str]] = [
        ({"population_chunk_size": 0}, {}, "population_chunk_size must be None or a positive int"),
        ({"population_chunk_size": 2.0}, {}, "(members run at a time), got 2.0"),
        ({"population_randomness": "error"}, {}, "population_randomness must be one of"),
        ({}, {"in_dims": {1: 0}}, "in_dims as a dict maps positions (0 to 0 here)"),
        ({}, {"in_dims": {"shift": 0}}, "['shift'] name no input of this call"),
        ({}, {"in_dims": {0: 1}}, "in_dims[0] must be 0 or None, got 1"),
    ]
    for attributes, call, message in cases:
        for name, value in attributes.items():
            setattr(r, name, value)
        with unchanged(r, x), pytest.raises(ValueError, match=re.escape(message)):
            r(x, flat_param=thetas, **call)
        for name in attributes:
            delattr(r, name)
    k = ReparamModule(KwModel())
    with pytest.raises(ValueError, match=re.escape("in_dims['shift'] is 0 but keyword input")):
        k(x[..., :5].flatten(1)[:, :5], flat_param=torch.randn(3, k.param_numel),
          shift=torch.randn(2, 3), in_dims={"shift": 0})  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("in_dims['shift'] must be 0 or None, got 1")):
        k(torch.randn(2, 5), flat_param=torch.randn(3, k.param_numel),
          shift=torch.randn(3, 3), in_dims={"shift": 1})  # fmt: skip
