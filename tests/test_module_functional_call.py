"""``torch.func.functional_call`` on the unwrapped module (``r.module``), against the same call
on a plain twin copied before wrapping: values, gradients, tied weights, buffers, threads, a
forward that raises, nesting in a call with another vector, ``vmap`` and ``torch.compile``."""

from __future__ import annotations

import copy
import re
import threading
from typing import Any

import pytest
import torch
from conftest import MODELS, build, shared_layer, unchanged
from torch import Tensor, nn
from torch.func import functional_call

from torchreparam import ReparamModule
from torchreparam._inject import innermost


def _pair(model: str) -> tuple[ReparamModule, nn.Module, tuple[Any, ...]]:
    factory, inputs = MODELS[model]
    torch.manual_seed(0)
    net = factory()
    twin = copy.deepcopy(net)
    return ReparamModule(net), twin, inputs()


def _given(twin: nn.Module, names: list[str], seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = dict(twin.named_parameters(remove_duplicate=False))
    return {n: torch.randn(params[n].shape, generator=g).requires_grad_() for n in names}


def _clone(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: t.detach().clone().requires_grad_(t.requires_grad) for n, t in params.items()}


def _same(got: Any, want: Any) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("model", "names", "tie_weights"),
    [
        ("mlp", ["2.weight"], True),
        ("mlp", ["0.weight", "0.bias", "2.weight", "2.bias"], True),
        ("tied", ["out.weight"], True),  # (its tie, emb.weight, reads it too)
        ("convbn", ["0.weight", "1.running_mean"], True),
    ],
)
def test_values_and_gradients_as_on_the_twin(model: str, names: list[str], tie_weights: bool) -> None:  # fmt: skip
    r, twin, x = _pair(model)
    given = _given(twin, [n for n in names if "running" not in n])
    if "1.running_mean" in names:
        given["1.running_mean"] = torch.randn(4)
    ref = _clone(given)
    out = functional_call(r.module, given, x, tie_weights=tie_weights)
    want = functional_call(twin, ref, x, tie_weights=tie_weights)
    _same(out, want)
    out.square().mean().backward()
    want.square().mean().backward()
    for n in given:
        _same(given[n].grad, ref[n].grad) if given[n].requires_grad else _same(given[n], ref[n])
    for p, q in zip(r.module.parameters(), twin.parameters(), strict=True):
        _same(p.grad, q.grad)  # the module's own parameters, where they were used
    assert innermost(r._core) is None
    _same(r.module(*x), twin(*x))
    _same(dict(r.module.state_dict()), dict(twin.state_dict()))


def test_tied_names_given_apart_are_refused_before_anything_changes() -> None:
    r, twin, x = _pair("tied")
    given = _given(twin, ["emb.weight", "out.weight"])
    for names, match in ((["emb.weight"], "but not the same tensor for ['out.weight']"), (["emb.weight", "out.weight"], "the same tensor")):  # fmt: skip
        with unchanged(r, *x), pytest.raises(ValueError, match=re.escape(match)):
            functional_call(r.module, {n: given[n] for n in names}, x, tie_weights=False)
        assert innermost(r._core) is None


def test_strict_missing_keys_as_on_the_twin() -> None:
    r, twin, x = _pair("mlp")
    errors = []
    for module in (r.module, twin):
        with pytest.raises(RuntimeError) as error:
            functional_call(module, _given(twin, ["2.weight"]), x, strict=True)
        errors.append(str(error.value))
    assert errors[0] == errors[1]


class Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            raise ValueError("positive")
        return self.a(x)


def test_a_forward_that_raises_leaves_nothing_bound() -> None:
    torch.manual_seed(0)
    r = ReparamModule(Raises())
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="positive"):
        functional_call(r.module, {"a.weight": torch.zeros(3, 3)}, x)
    assert innermost(r._core) is None
    assert r.module.a.weight is r.module.a.weight  # (the module's own leaf again)
    _same(r.module(-x), r(-x))


def test_threads_see_their_own_tensors() -> None:
    r, twin, x = _pair("mlp")
    givens = [_given(twin, ["0.weight", "2.bias"], seed) for seed in range(4)]
    expected = [functional_call(twin, g, x).detach() for g in givens]
    own = twin(*x).detach()
    barrier, failures = threading.Barrier(5), []

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(30):
            if i == 4:  # the module's own weights, meanwhile
                got, want = r.module(*x), own
            else:
                got, want = functional_call(r.module, givens[i], x), expected[i]
            if not torch.equal(got, want):
                failures.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_inside_a_call_with_another_vector() -> None:
    r, twin, x = _pair("mlp")
    theta = torch.randn(r.param_numel)
    given = _given(twin, ["2.weight"])
    with r.unflattened_param(theta):
        out = functional_call(r.module, given, x)
        after = r.module(*x)
    want = functional_call(twin, {**r.layout.unflatten(theta), **given}, x)
    _same(out, want)
    _same(after, functional_call(twin, r.layout.unflatten(theta), x))
    assert innermost(r._core) is None


def test_a_shared_submodule_reads_its_own_weights_afterwards() -> None:
    """Plain torch puts the given tensor back last here (it swaps '0.weight', then '2.weight',
    the same attribute, and restores in that order): its module keeps the given tensor. The
    wrapped module's attribute reads its own weight again, as it should."""
    torch.manual_seed(0)
    net = shared_layer()
    twin, x = copy.deepcopy(net), torch.randn(4, 5)
    r = ReparamModule(net)
    given = _given(twin, ["0.weight"])
    _same(
        functional_call(r.module, given, x), functional_call(copy.deepcopy(twin), _clone(given), x)
    )
    assert innermost(r._core) is None
    _same(r.module(x), twin(x))


def test_vmap_over_stacked_parameters() -> None:
    r, twin, x = _pair("mlp")
    stacked = {n: torch.randn(3, *p.shape) for n, p in twin.named_parameters()}
    got = torch.func.vmap(lambda p: functional_call(r.module, p, x))(stacked)
    want = torch.func.vmap(lambda p: functional_call(twin, p, x))(stacked)
    _same(got, want)


def test_compiled() -> None:
    torch._dynamo.reset()
    r, twin, x = _pair("mlp")
    f = torch.compile(
        lambda m, w, inp: functional_call(m, {"2.weight": w}, inp), backend="aot_eager"
    )
    for seed in (1, 2):
        w = _given(twin, ["2.weight"], seed)["2.weight"]
        _same(f(r.module, w, x), functional_call(twin, {"2.weight": w}, x))
    assert innermost(r._core) is None
    _same(r.module(*x), twin(*x))
    torch._dynamo.reset()


def test_a_callers_vector_swapped_in_by_functional_call_is_not_kept() -> None:
    r, _, (x,) = build("mlp")
    theta = torch.randn(r.param_numel)
    torch.func.functional_call(r, {"flat_param": theta}, (x,))
    assert r._core._cache is None or r._core._cache[0] is not theta
