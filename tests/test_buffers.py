"""Buffers and BatchNorm (track_running_stats=True) in every mode, against the plain module."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build, reference, snapshot
from torch import nn

import torchreparam._call as call_module  # (its snapshot function is counted below)
from torchreparam import ReparamModule


def _bn_net() -> tuple[ReparamModule, nn.Module, torch.Tensor]:
    r, twin, (x,) = build("convbn")
    return r, twin, x


def _plain_with_buffers(
    twin: nn.Module, theta: torch.Tensor, buffers: list[torch.Tensor], x: torch.Tensor, layout
) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The plain module given these weights and these buffer tensors (mutated as plain would)."""
    names = [n for n, _ in twin.named_buffers()]
    state = {**layout.unflatten(theta), **dict(zip(names, buffers, strict=True))}
    return torch.func.functional_call(twin, state, (x,))


def test_train_mode_with_passed_buffers_updates_them_and_not_the_module() -> None:
    r, twin, x = _bn_net()
    own_before = snapshot(r.module)
    theta = torch.randn(r.param_numel)
    mine = [b.clone() for b in twin.buffers()]
    theirs = [b.clone() for b in twin.buffers()]
    out = r(x, flat_param=theta, buffers=mine)
    expected = _plain_with_buffers(twin, theta, theirs, x, r.layout)
    assert torch.equal(out, expected)
    for a, b in zip(mine, theirs, strict=True):
        assert torch.equal(a, b)  # updated exactly as the plain module updates them
    assert not torch.equal(mine[0], own_before["1.running_mean"])
    for key, value in snapshot(r.module).items():
        assert torch.equal(value, own_before[key]), key  # the module's own: untouched


def test_train_mode_without_buffers_updates_the_modules_own() -> None:
    r, twin, x = _bn_net()
    r(x)
    twin(x)
    for a, b in zip(r.module.buffers(), twin.buffers(), strict=True):
        assert torch.equal(a, b)
    assert r.module[1].num_batches_tracked.item() == 1


def test_eval_mode_updates_nothing() -> None:
    r, twin, x = _bn_net()
    r.eval()
    twin.eval()
    given = [b.clone() + 1 for b in twin.buffers()]
    before_given = [b.clone() for b in given]
    before_own = snapshot(r.module)
    theta = torch.randn(r.param_numel)
    out = r(x, flat_param=theta, buffers=given)
    assert torch.equal(
        out, _plain_with_buffers(twin, theta, [b.clone() for b in given], x, r.layout)
    )
    assert all(torch.equal(a, b) for a, b in zip(given, before_given, strict=True))
    assert all(torch.equal(v, before_own[k]) for k, v in snapshot(r.module).items())


def test_buffers_by_name_for_a_subset() -> None:
    r, twin, x = _bn_net()
    r.eval()
    twin.eval()
    mean = torch.randn(4)
    out = r(x, buffers={"1.running_mean": mean})
    twin[1].running_mean.copy_(mean)
    assert torch.equal(out, twin(x))


@pytest.mark.parametrize("strategy", ["loop", "vmap", "auto"])
def test_population_with_per_member_buffers_in_train_mode(strategy: str) -> None:
    r, twin, x = _bn_net()
    r.population_strategy = strategy
    P = 3
    thetas = torch.randn(P, r.param_numel)
    per_member = [b.expand(P, *b.shape).clone() for b in twin.buffers()]
    singles = [[b.clone() for b in twin.buffers()] for _ in range(P)]
    own_before = snapshot(r.module)
    out = r(x, flat_param=thetas, buffers=per_member)
    for i in range(P):
        expected = r(x, flat_param=thetas[i], buffers=singles[i])
        torch.testing.assert_close(out[i], expected)
        for stacked, single in zip(per_member, singles[i], strict=True):
            torch.testing.assert_close(stacked[i], single)  # each member updated its own
    assert all(torch.equal(v, own_before[k]) for k, v in snapshot(r.module).items())


def test_population_in_train_mode_with_shared_buffers_is_the_sequential_loop() -> None:
    r, twin, x = _bn_net()
    thetas = torch.randn(3, r.param_numel)
    r(x, flat_param=thetas)  # auto: the loop, since shared buffers are updated in train mode
    for theta in thetas:
        reference(twin, r.layout, theta, (x,))
    for a, b in zip(r.module.buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(a, b)
    assert r.module[1].num_batches_tracked.item() == 3
    r.population_strategy = "vmap"
    with pytest.raises(ValueError, match="would update buffers shared by all members once"):
        r(x, flat_param=thetas)
    assert r.module[1].num_batches_tracked.item() == 3


def test_pure_form_returns_updated_buffers_and_mutates_nothing() -> None:
    r, twin, x = _bn_net()
    theta = torch.randn(r.param_numel)
    given = [b.clone() for b in twin.buffers()]
    given_before = [b.clone() for b in given]
    own_before = snapshot(r.module)
    out, state = r.pure(x, flat_param=theta, buffers=given)
    expected_buffers = [b.clone() for b in given]
    assert torch.equal(out, _plain_with_buffers(twin, theta, expected_buffers, x, r.layout))
    assert list(state) == [n for n, _ in twin.named_buffers()]
    for got, want in zip(state.values(), expected_buffers, strict=True):
        assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(given, given_before, strict=True))
    assert all(torch.equal(v, own_before[k]) for k, v in snapshot(r.module).items())


def test_pure_form_for_a_population_gives_each_member_its_state() -> None:
    r, _, x = _bn_net()
    thetas = torch.randn(2, r.param_numel)
    out, state = r.pure(x, flat_param=thetas)
    assert out.shape[0] == 2
    assert state["1.running_mean"].shape == (2, 4)
    assert state["1.num_batches_tracked"].tolist() == [1, 1]
    _, single = r.pure(x, flat_param=thetas[1])
    torch.testing.assert_close(state["1.running_var"][1], single["1.running_var"])


def test_module_that_reassigns_a_buffer_writes_into_the_binding() -> None:
    class Ema(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.register_buffer("avg", torch.zeros(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.lin(x)
            self.avg = 0.9 * self.avg + 0.1 * y.mean(0).detach()  # reassigned, not in place
            return y + self.avg

    net = Ema()
    twin = copy.deepcopy(net)
    r = ReparamModule(net)
    x = torch.randn(4, 3)
    out, state = r.pure(x)
    assert torch.equal(out, twin(x))
    assert torch.equal(state["avg"], twin.avg)
    assert torch.equal(r.module.avg, torch.zeros(3))  # the module's own: untouched
    given = [torch.zeros(3)]
    r(x, buffers=given)  # passed buffers receive what the module reassigned
    assert torch.equal(given[0], twin.avg)
    assert torch.equal(r.module.avg, torch.zeros(3))
    for strategy in ("loop", "vmap"):
        r.population_strategy = strategy
        _, members = r.pure(x, flat_param=torch.stack([r.flat_param.detach()] * 2))
        torch.testing.assert_close(members["avg"], twin.avg.expand(2, 3))
    r(x)  # a plain call reassigns the module's own, as a plain module does
    assert torch.equal(r.module.avg, twin.avg)


def test_gradcheck_through_batchnorm_in_train_mode() -> None:
    r, _, (x,) = build("convbn", torch.float64)

    def f(theta: torch.Tensor) -> torch.Tensor:
        return r.pure(x, flat_param=theta)[0]

    theta = torch.randn(r.param_numel, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (theta,))
    assert torch.autograd.gradgradcheck(f, (theta,))
    assert r.module[1].num_batches_tracked.item() == 0


def test_a_call_that_raises_restores_running_statistics_also_after_successful_calls() -> None:
    r, _, x = _bn_net()
    r(x)  # successful calls first (the statistics move, as plain)
    r.eval()
    r(x)
    r.train()  # and a mode switch
    before = snapshot(r)
    handle = r.module[3].register_forward_pre_hook(_raise)
    with pytest.raises(KeyError):
        r(x)
    handle.remove()
    after = snapshot(r)
    assert all(torch.equal(before[k], after[k]) for k in before)


def _raise(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    raise KeyError("after BatchNorm ran")


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


def test_a_population_loop_takes_one_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    r, _, (x,) = build("convbn")
    r.population_strategy = "loop"
    taken = []
    real = call_module.snapshot
    monkeypatch.setattr(call_module, "snapshot", lambda core: taken.append(1) or real(core))
    r(x, flat_param=torch.randn(5, r.param_numel))
    assert len(taken) == 1
