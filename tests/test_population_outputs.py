"""Population calls: outputs that are not tensors, and ``"auto"``'s trial leaving no trace.

The reference is always the loop of single calls (``population_strategy = "loop"``, or the
members called one by one)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from torchreparam import ReparamModule, _population

STRATEGIES = ["loop", "vmap", "auto"]


class Cache:
    """A cache object that is not a pytree node (as Hugging Face's caches are not)."""

    def __init__(self, keys: Tensor) -> None:
        self.keys = keys


class Mixed(nn.Module):
    """Returns a tensor, a Python float, an int that depends on the weights, None, a string
    and a cache object holding a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> dict[str, Any]:
        y = self.lin(x)
        positive = int((self.lin.weight > 0).sum())
        return {
            "y": y,
            "stats": (y.abs().max().item(), positive, None),
            "name": "mixed",
            "cache": Cache(y.detach() * 2),
        }


def _members(r: ReparamModule, thetas: Tensor, *args: Any) -> list[Any]:
    return [r(*args, flat_param=theta) for theta in thetas]


@pytest.mark.parametrize("strategy", ["loop", "auto"])
def test_values_that_are_not_tensors_come_back_per_member(strategy: str) -> None:
    r = ReparamModule(Mixed())
    r.population_strategy = strategy
    thetas, x = torch.randn(4, r.param_numel), torch.randn(5, 3)
    out = r(x, flat_param=thetas)
    singles = _members(r, thetas, x)
    torch.testing.assert_close(out["y"], torch.stack([s["y"] for s in singles]))
    peaks, positives, nothing = out["stats"]
    assert peaks == [s["stats"][0] for s in singles]
    assert len(set(peaks)) == 4  # (each member's own: not member 0's four times)
    assert positives == [s["stats"][1] for s in singles]
    assert nothing is None
    assert out["name"] == ["mixed"] * 4
    assert [type(c) for c in out["cache"]] == [Cache] * 4
    for cache, single in zip(out["cache"], singles, strict=True):
        torch.testing.assert_close(cache.keys, single["cache"].keys)
    if strategy == "auto":
        assert set(r._plans.values()) == {"loop"}  # (vmap cannot give them: the trial failed)
        again = r(x, flat_param=thetas)
        assert again["stats"][0] == peaks


def test_vmap_refuses_values_other_than_tensors_and_none() -> None:
    class WithCache(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> tuple[Tensor, list[Cache]]:
            y = self.lin(x)
            return y, [Cache(y)]

    r = ReparamModule(WithCache())
    r.population_strategy = "vmap"
    thetas, x = torch.randn(4, r.param_numel), torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"tensors only.*type Cache at output\[1\]\[0\]"):
        r(x, flat_param=thetas)
    r.population_strategy = "loop"
    out = r(x, flat_param=thetas)  # the list's structure, its one leaf a list of the members'
    assert len(out[1]) == 1
    assert [type(c) for c in out[1][0]] == [Cache] * 4


@pytest.mark.parametrize("strategy", [*STRATEGIES, "batched"])
def test_none_stays_none_with_every_strategy(strategy: str) -> None:
    class MaybeWeights(nn.Module):  # as nn.MultiheadAttention(need_weights=False) returns
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
            return self.lin(x).softmax(-1), None

    r = ReparamModule(MaybeWeights()).eval()
    thetas, x = 0.3 * torch.randn(3, r.param_numel), torch.randn(2, 5, 4)
    r.population_strategy = strategy
    out, weights = r(x, flat_param=thetas)
    assert weights is None
    expected = torch.stack([r(x, flat_param=theta)[0] for theta in thetas])
    torch.testing.assert_close(out, expected)


def test_members_returning_different_structures_are_refused() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.bn = nn.BatchNorm1d(2)

        def forward(self, x: Tensor) -> Any:
            y = self.bn(self.lin(x))
            return {"y": y, "extra": y} if float(self.lin.bias[0]) > 0 else {"y": y}

    r = ReparamModule(Branchy())  # train mode: the members update the module's own buffers
    thetas = torch.randn(2, r.param_numel)
    thetas[0, r.layout["lin.bias"].offset] = 1.0
    thetas[1, r.layout["lin.bias"].offset] = -1.0
    before = {n: b.clone() for n, b in r.module.named_buffers()}
    with pytest.raises(ValueError, match="differ in structure: member 0 returned"):
        r(torch.randn(4, 3), flat_param=thetas)
    for name, b in r.module.named_buffers():  # the whole population undone
        torch.testing.assert_close(b, before[name], rtol=0, atol=0)


def test_members_returning_different_shapes_are_refused() -> None:
    class Ragged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            y = self.lin(x)
            keep = 1 + int(float(self.lin.bias[0]) > 0)
            return y, y[:keep]

    r = ReparamModule(Ragged())
    r.population_strategy = "loop"
    thetas = torch.randn(2, r.param_numel)
    thetas[0, r.layout["lin.bias"].offset] = 1.0
    thetas[1, r.layout["lin.bias"].offset] = -1.0
    with pytest.raises(ValueError, match=r"differ in shape at output\[1\]: \[\(2, 2\), \(1, 2\)\]"):
        r(torch.randn(4, 3), flat_param=thetas)


def test_a_hugging_face_cache_comes_back_per_member() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        hidden_size=16,
        intermediate_size=32,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        vocab_size=50,
    )
    r = ReparamModule(transformers.LlamaForCausalLM(config)).eval()
    thetas = r.flat_param.detach() + 0.05 * torch.randn(3, r.param_numel)
    ids = torch.randint(0, 50, (2, 5))
    out = r(ids, flat_param=thetas, use_cache=True)  # "auto": the loop
    caches = out.past_key_values
    assert isinstance(caches, list)
    assert len(caches) == 3
    for i, (theta, cache) in enumerate(zip(thetas, caches, strict=True)):
        single = r(ids, flat_param=theta, use_cache=True)
        torch.testing.assert_close(out.logits[i], single.logits)
        mine, theirs = cache.layers[0], single.past_key_values.layers[0]
        torch.testing.assert_close(mine.keys, theirs.keys)
        torch.testing.assert_close(mine.values, theirs.values)
    assert not torch.equal(caches[0].layers[0].keys, caches[1].layers[0].keys)


# ---- "auto": its trial leaves no trace ---------------------------------------------------------
class Counter(nn.Module):
    """Counts its calls in a buffer, in eval mode too."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.lin(x)


class Reassigning(Counter):
    """The same, by reassigning the buffer (``self.calls = ...``)."""

    def forward(self, x: Tensor) -> Tensor:
        self.calls = self.calls + 1
        return self.lin(x)


def _bn() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.3))


@pytest.fixture(params=["clock", "batched_wins"])
def clock(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The real clock, or one by which the batched call always wins the trial (when it runs
    without error): the outcome must not depend on it."""
    if request.param == "batched_wins":
        trial = _population._trial

        def fast(*args: Any, **kwargs: Any) -> float:
            trial(*args, **kwargs)
            return 0.0

        monkeypatch.setattr(_population, "_trial", fast)
    return str(request.param)


def _same_state(a: nn.Module, b: nn.Module) -> None:
    for (name, mine), (_, theirs) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)


def _twins(make: Any, train: bool) -> tuple[ReparamModule, ReparamModule]:
    net = make()
    twin = copy.deepcopy(net)
    auto, loop = ReparamModule(net), ReparamModule(twin)
    auto.train(train)
    loop.train(train)
    auto.population_strategy, loop.population_strategy = "auto", "loop"
    return auto, loop


@pytest.mark.parametrize("make", [Counter, Reassigning, _bn], ids=["counter", "reassign", "bn"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("per_member", [False, True], ids=["own", "per_member"])
def test_auto_ends_as_the_loop(make: Any, train: bool, per_member: bool, clock: str) -> None:
    auto, loop = _twins(make, train)
    population = 3
    thetas = auto.flat_param.detach() + 0.1 * torch.randn(population, auto.param_numel)
    x = torch.randn(5, 3)
    own = [b.clone() for b in auto.module.buffers()]
    buffers = {
        r: [b.expand(population, *b.shape).clone() for b in own] if per_member else None
        for r in (auto, loop)
    }
    for call in range(3):  # the first call times the trial; the next use its choice
        torch.manual_seed(call)
        got = auto(x, flat_param=thetas, buffers=buffers[auto])
        after_auto = torch.rand(3)  # the random state after the call
        torch.manual_seed(call)
        expected = loop(x, flat_param=thetas, buffers=buffers[loop])
        assert torch.equal(after_auto, torch.rand(3))
        if call == 0:  # the loop's own result
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        else:  # a batched call's, where it was chosen: equal up to rounding
            torch.testing.assert_close(got, expected)
        _same_state(auto.module, loop.module)
        if per_member:
            for mine, theirs in zip(buffers[auto], buffers[loop], strict=True):
                exact = {"rtol": 0, "atol": 0} if call == 0 else {}
                torch.testing.assert_close(mine, theirs, **exact)
    if make is not _bn and not per_member:  # a shared buffer updated: only the loop, always
        assert set(auto._plans.values()) <= {"loop"}  # (train mode: no trial at all)
        assert float(auto.module.calls) == 3 * population


def test_auto_with_a_counter_still_uses_vmap_where_it_is_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Per-member counters: the batched call updates each member's own, as the loop does."""
    trial = _population._trial

    def fast(*args: Any, **kwargs: Any) -> float:
        trial(*args, **kwargs)
        return 0.0

    monkeypatch.setattr(_population, "_trial", fast)
    r = ReparamModule(Counter()).eval()
    calls = torch.zeros(4)
    thetas, x = torch.randn(4, r.param_numel), torch.randn(5, 3)
    r(x, flat_param=thetas, buffers=[calls])
    assert set(r._plans.values()) == {"vmap"}
    r(x, flat_param=thetas, buffers=[calls])
    torch.testing.assert_close(calls, torch.full((4,), 2.0))
    assert float(r.module.calls) == 0


def test_dropout_draws_as_in_the_loop_alone() -> None:
    auto, loop = _twins(lambda: nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5)), train=True)
    thetas, x = torch.randn(4, auto.param_numel), torch.randn(5, 3)
    torch.manual_seed(7)
    got = auto(x, flat_param=thetas)  # first call: trial (batched) + loop
    torch.manual_seed(7)
    torch.testing.assert_close(got, loop(x, flat_param=thetas), rtol=0, atol=0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shared_buffers_of_an_enclosing_block_are_read_by_every_strategy(strategy: str) -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    twin = copy.deepcopy(net).eval()
    r = ReparamModule(net).eval()
    r.population_strategy = strategy
    stats = {"1.running_mean": torch.randn(4), "1.running_var": torch.rand(4) + 0.5}
    thetas, x = torch.randn(3, r.param_numel), torch.randn(5, 3)
    with r.replaced_buffers(stats):
        out = r(x, flat_param=thetas)
    for theta, member in zip(thetas, out, strict=True):
        state = {**r.layout.unflatten(theta, aliases=True), **stats}
        torch.testing.assert_close(member, torch.func.functional_call(twin, state, (x,)))
