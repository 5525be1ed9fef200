"""``unroll``: every memory mode against the plain unrolled loop written out by hand.

The reference is the loop users write today: ``torch.func.functional_call`` on an unwrapped
twin with a per-tensor dict, ``torch.autograd.grad(..., create_graph=True)`` and the pure steps
(``sgd``/``adam``, themselves tested against ``torch.optim``), differentiated by autograd.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import reference
from torch import Tensor, nn

from benchmarks.subprocess_run import TUNED_MALLOC
from torchreparam import AdamState, ReparamModule, SGDState, adam, sgd, unroll

OPTIMIZERS: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {
    "sgd": (sgd, {}),
    "momentum": (sgd, {"momentum": 0.9}),
    "nesterov_wd": (sgd, {"momentum": 0.5, "nesterov": True, "weight_decay": 0.01}),
    "adam": (adam, {"betas": (0.8, 0.9)}),
}


def _convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 3)
    )


class Task:
    """A wrapped conv net, its unwrapped twin and a distilled-data-like batch."""

    def __init__(self, dtype: torch.dtype = torch.float64, population: int | None = None) -> None:
        torch.manual_seed(0)
        plain = _convnet().to(dtype)
        self.twin = copy.deepcopy(plain)
        self.r = ReparamModule(plain)
        theta = self.r.flat_param.detach().clone()
        if population is not None:
            theta = theta + 0.1 * torch.randn(population, theta.numel(), dtype=dtype)
        self.theta0 = theta.requires_grad_()
        self.x = torch.randn(6, 1, 5, 5, dtype=dtype, requires_grad=True)
        self.y = torch.randint(0, 3, (6,))
        self.lr = torch.tensor(0.3, dtype=dtype, requires_grad=True)

    def loss(self, theta: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.r(x, flat_param=theta), y)

    def reference_loss(self, theta: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(reference(self.twin, self.r.layout, theta, (x,)), y)

    def batches(self, k: int) -> list[tuple[Tensor, Tensor]]:
        return [(self.x, self.y)] * k


def plain_loop(
    loss: Callable[[Tensor, Any], Tensor],
    theta: Tensor,
    batches: list[Any],
    update: Callable[..., Any],
    **hyper: Any,
) -> tuple[Tensor, Any]:
    state = None
    for batch in batches:
        (g,) = torch.autograd.grad(loss(theta, batch), theta, create_graph=True)
        theta, state = update(theta, g, state, **hyper)
    return theta, state


def _grads(out: Tensor, task: Task) -> tuple[Tensor, ...]:
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    return torch.autograd.grad(
        (out * weights).sum(), [task.theta0, task.x, task.lr], allow_unused=True
    )  # type: ignore[return-value]


def _close(got: tuple[Tensor, ...], want: tuple[Tensor, ...], rtol: float, atol: float) -> None:
    for g, w in zip(got, want, strict=True):
        if g is None or w is None:
            assert g is None
            assert w is None
        else:
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize(
    "memory", ["full", "checkpoint", "checkpoint-3", "checkpoint-20", "checkpoint-3-1"]
)
def test_exact_modes_equal_the_plain_loop_in_float64(opt: str, memory: str) -> None:
    task = Task()
    update, hyper = OPTIMIZERS[opt]
    batches = task.batches(7)
    want, _ = plain_loop(task.reference_loss, task.theta0, batches, update, lr=task.lr, **hyper)
    mode, *strides = memory.split("-")
    extra = dict(zip(["segment", "inner_segment"], map(int, strides), strict=False))
    got = unroll(
        task.loss, task.theta0, batches, optimizer=update, memory=mode, lr=task.lr, **extra, **hyper
    )  # type: ignore[arg-type]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    _close(_grads(got, task), _grads(want, task), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opt", ["momentum", "adam"])
def test_checkpoint_equals_full_in_float32_at_rtol_1e5(opt: str) -> None:
    task = Task(torch.float32)
    update, hyper = OPTIMIZERS[opt]
    batches = task.batches(12)
    full = unroll(
        task.loss, task.theta0, batches, optimizer=update, memory="full", lr=task.lr, **hyper
    )
    ckpt = unroll(task.loss, task.theta0, batches, optimizer=update, lr=task.lr, **hyper)
    _close(_grads(ckpt, task), _grads(full, task), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("memory", ["full", "checkpoint", "two-level"])
def test_gradcheck_float64(memory: str) -> None:
    torch.manual_seed(0)
    r = ReparamModule(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double())
    y = torch.randint(0, 2, (5,))

    def loss(theta: Tensor, batch: Tensor) -> Tensor:
        return F.cross_entropy(r(batch, flat_param=theta), y)

    def f(theta: Tensor, x: Tensor, lr: Tensor) -> Tensor:
        if memory == "two-level":
            return unroll(loss, theta, [x] * 5, segment=3, inner_segment=1, lr=lr, momentum=0.9)
        return unroll(loss, theta, [x] * 3, memory=memory, lr=lr, momentum=0.9)  # type: ignore[arg-type]

    inputs = (
        r.flat_param.detach().clone().requires_grad_(),
        torch.randn(5, 3, dtype=torch.float64, requires_grad=True),
        torch.tensor(0.2, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(f, inputs)
    if memory == "full":
        assert torch.autograd.gradgradcheck(f, inputs)


def test_per_parameter_learning_rates_and_batches_that_differ_per_step() -> None:
    task = Task()
    lrs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(6, 1, 5, 5, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    batches = [(xs[t % 4], task.y) for t in range(9)]

    def run(loss: Callable[..., Tensor], memory: str | None) -> tuple[Tensor, ...]:
        lr = task.r.layout.expand(lrs)
        if memory is None:
            out, _ = plain_loop(loss, task.theta0, batches, sgd, lr=lr)
        else:
            out = unroll(loss, task.theta0, batches, memory=memory, segment=2, lr=lr)  # type: ignore[arg-type]
        return torch.autograd.grad(out.square().sum(), [task.theta0, lrs, *xs])

    _close(run(task.loss, "checkpoint"), run(task.reference_loss, None), 1e-10, 1e-12)


def test_a_population_is_every_member_on_its_own() -> None:
    task = Task(population=3)
    batches = task.batches(5)

    def summed(theta: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        return (
            task.loss(theta, batch)
            if theta.dim() == 1
            else sum(task.loss(row, batch) for row in theta.unbind())
        )  # type: ignore[return-value]

    out = unroll(summed, task.theta0, batches, lr=0.3, momentum=0.9)
    members = [
        unroll(task.loss, row, batches, memory="full", lr=0.3, momentum=0.9)
        for row in task.theta0.unbind()
    ]
    torch.testing.assert_close(out, torch.stack(members))
    got = torch.autograd.grad(out.square().sum(), [task.theta0, task.x])
    want = torch.autograd.grad(torch.stack(members).square().sum(), [task.theta0, task.x])
    _close(got, want, 1e-10, 1e-12)


def test_the_state_comes_back_and_a_given_state_is_differentiated() -> None:
    task = Task()
    momentum = torch.randn(task.r.param_numel, dtype=torch.float64, requires_grad=True)
    start = SGDState(momentum)
    outs = {}
    for memory in ("full", "checkpoint"):
        res = unroll(task.loss, task.theta0, task.batches(4), memory=memory, state=start,
                     lr=0.2, momentum=0.9, return_state=True)  # fmt: skip
        assert isinstance(res.state, SGDState)
        loss = res.theta.square().sum() + res.state.momentum_buffer.sum()
        outs[memory] = (res.theta, *torch.autograd.grad(loss, [task.theta0, momentum]))
    _close(outs["checkpoint"], outs["full"], 1e-10, 1e-12)
    adam_state = unroll(task.loss, task.theta0, task.batches(3), optimizer="adam",
                        return_state=True).state  # fmt: skip
    assert isinstance(adam_state, AdamState)
    assert adam_state.step == 3


def test_threaded_buffers_equal_the_plain_loop_and_batchnorm_updates_once() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()
    plain = copy.deepcopy(net)
    r = ReparamModule(net)
    x = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(16, 1, dtype=torch.float64)
    start = {k: v.clone() for k, v in net.named_buffers()}

    def loss(theta: Tensor, batch: Any, buffers: Any) -> tuple[Tensor, Any]:
        out, new = r.pure(batch[0], flat_param=theta, buffers=buffers)
        return F.mse_loss(out, batch[1]), new

    theta0 = r.flat_param.detach().clone().requires_grad_()
    res = {}
    for memory in ("full", "checkpoint"):
        got = unroll(loss, theta0, [(x, y)] * 5, memory=memory, buffers=start, lr=0.1,
                     return_state=True)  # fmt: skip
        res[memory] = (got.theta, *torch.autograd.grad(got.theta.sum(), [theta0, x]))
        assert got.buffers["1.num_batches_tracked"].item() == 5
        twin = copy.deepcopy(plain)  # the plain loop on a plain module: 5 updates
        theta = theta0
        for _ in range(5):
            (g,) = torch.autograd.grad(
                F.mse_loss(reference(twin, r.layout, theta, (x,)), y), theta, create_graph=True
            )
            theta = theta - 0.1 * g
        for name, value in twin.named_buffers():
            torch.testing.assert_close(got.buffers[name], value)
    _close(res["checkpoint"], res["full"], 1e-10, 1e-12)
    for name, value in net.named_buffers():  # the module's own were never touched
        assert torch.equal(value, start[name])


def test_a_loss_that_updates_buffers_in_place_is_refused_before_any_change() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    r = ReparamModule(net)
    before = {k: v.clone() for k, v in r.state_dict().items()}
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    theta0 = r.flat_param.detach().requires_grad_()
    message = "inner_loss changes a tensor it did not create in place (shape (4,)"
    for memory, extra in (("checkpoint", {}), ("implicit", {"prox": 1.0})):
        with pytest.raises(ValueError, match=re.escape(message)):
            unroll(lambda t, b: F.mse_loss(r(b[0], flat_param=t), b[1]), theta0, [(x, y)] * 3,
                   memory=memory, lr=0.1, **extra)  # fmt: skip
    for k, v in r.state_dict().items():
        assert torch.equal(v, before[k]), k
    full = unroll(lambda t, b: F.mse_loss(r(b[0], flat_param=t), b[1]), theta0, [(x, y)] * 3,
                  memory="full", lr=0.1)  # fmt: skip
    assert full.requires_grad
    assert r.module[1].num_batches_tracked.item() == 3


def test_dropout_is_replayed_exactly() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Linear(16, 1)).double()
    r = ReparamModule(net)
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(8, 1, dtype=torch.float64)
    theta0 = r.flat_param.detach().requires_grad_()
    res = {}
    for memory in ("full", "checkpoint"):
        torch.manual_seed(1)
        out = unroll(lambda t, b: F.mse_loss(r(b[0], flat_param=t), b[1]), theta0, [(x, y)] * 4,
                     memory=memory, lr=0.1)  # fmt: skip
        after = torch.rand(1)  # the generator ends where the plain loop leaves it
        res[memory] = (out, after, *torch.autograd.grad(out.sum(), [theta0, x]))
    _close(res["checkpoint"], res["full"], 1e-10, 1e-12)


def test_a_loss_that_is_not_a_function_of_its_inputs_is_refused_at_backward() -> None:
    task = Task()
    gen = torch.Generator().manual_seed(0)

    def noisy(theta: Tensor, batch: Any) -> Tensor:
        noise = torch.randn(batch[0].shape, generator=gen, dtype=torch.float64)
        return task.loss(theta, (batch[0] + noise, batch[1]))

    out = unroll(noisy, task.theta0, task.batches(3), lr=0.5)
    with pytest.raises(RuntimeError, match="gave another vector than the forward sweep"):
        out.sum().backward()


def test_a_closure_tensor_that_requires_grad_is_refused_and_full_mode_differentiates_it() -> None:
    task = Task()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)

    def loss(theta: Tensor, batch: Any) -> Tensor:
        return task.loss(theta, (batch[0] * scale, batch[1]))

    message = "inner_loss reads a tensor that requires grad but is not among its inputs (shape ()"
    with pytest.raises(ValueError, match=re.escape(message)):
        unroll(loss, task.theta0, task.batches(3), lr=0.5)
    out = unroll(loss, task.theta0, task.batches(3), memory="full", lr=0.5)
    want, _ = plain_loop(loss, task.theta0, task.batches(3), sgd, lr=0.5)
    torch.testing.assert_close(
        torch.autograd.grad(out.sum(), scale), torch.autograd.grad(want.sum(), scale)
    )


def test_the_modules_own_weights_are_refused() -> None:
    task = Task()
    with pytest.raises(ValueError, match="call the module with flat_param=theta"):
        unroll(lambda t, b: task.loss(t, b) + task.r(b[0]).sum(), task.theta0, task.batches(2),
               lr=0.1)  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("does not depend on theta")):
        unroll(lambda t, b: task.r(b[0]).sum() * 0 + t.detach().sum(), task.theta0,
               task.batches(2), memory="full", lr=0.1)  # fmt: skip


def test_a_batch_changed_in_place_before_backward_is_refused() -> None:
    task = Task()
    out = unroll(task.loss, task.theta0, task.batches(3), lr=0.5)
    with torch.no_grad():
        task.x.add_(1.0)
    with pytest.raises(RuntimeError, match=re.escape("was modified in place after unroll()")):
        out.sum().backward()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"memory": "lazy"}, ValueError, "memory must be one of ['full', 'checkpoint', "),
        ({"memory": "truncated"}, ValueError, "memory='truncated' needs window=W"),
        ({"memory": "truncated", "window": 9}, ValueError, "an int in [0, 4]"),
        ({"memory": "implicit"}, ValueError, "memory='implicit' needs prox=lambda > 0"),
        ({"window": 2}, ValueError, "window applies to memory='truncated' only"),
        ({"segment": 0}, ValueError, "segment must be a positive int"),
        ({"segment": True}, ValueError, "segment must be a positive int"),
        ({"segment": 2, "inner_segment": 3}, ValueError, "inner_segment must be an int in [1, "),
        ({"segment": 2, "inner_segment": 0}, ValueError, "segment=2), or None, but got 0"),
        ({"segment": 2, "inner_segment": 1.0}, ValueError, "inner_segment must be an int"),
        ({"segment": 2, "inner_segment": True}, ValueError, "inner_segment must be an int"),
        (
            {"memory": "full", "inner_segment": 1},
            ValueError,
            "inner_segment applies to memory='checkpoint' only",
        ),
        ({"optimizer": "rmsprop"}, ValueError, "optimizer must be one of ['adam', 'sgd']"),
        ({"lr": 0.1, "betas": (0.9, 0.9)}, TypeError, "unknown ['betas']; it takes"),
        ({"optimizer": "sgd", "lr": None, "momentum": 0.1, "drop": 1}, TypeError, "unknown"),
    ],
)
def test_bad_arguments_are_refused_before_any_step(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    task = Task()
    calls = []

    def loss(theta: Tensor, batch: Any) -> Tensor:
        calls.append(1)
        return task.loss(theta, batch)

    kwargs = {"lr": 0.1, **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        unroll(loss, task.theta0, task.batches(4), **kwargs)
    assert not calls


def test_missing_learning_rate_and_bad_vectors_and_batches() -> None:
    task = Task()
    with pytest.raises(TypeError, match=re.escape("missing ['lr']")):
        unroll(task.loss, task.theta0, task.batches(2))
    with pytest.raises(ValueError, match="theta must be a floating-point vector"):
        unroll(task.loss, task.theta0.view(1, 1, -1), task.batches(2), lr=0.1)
    with pytest.raises(TypeError, match="batches must be a sequence with one batch per inner step"):
        unroll(task.loss, task.theta0, task.x, lr=0.1)
    assert unroll(task.loss, task.theta0, [], lr=0.1) is task.theta0
    with pytest.raises(TypeError, match="inner_loss must be a function"):
        unroll(None, task.theta0, task.batches(2), lr=0.1)  # type: ignore[arg-type]


@pytest.mark.parametrize("memory", ["full", "checkpoint", "truncated", "implicit"])
def test_without_grad_every_mode_runs_the_steps(memory: str) -> None:
    task = Task()
    extra = {"truncated": {"window": 2}, "implicit": {"prox": 0.0001}}.get(memory, {})
    with torch.no_grad():
        want, _ = plain_loop_values(task, 4)
        got = unroll(task.loss, task.theta0, task.batches(4), memory=memory, lr=0.3, **extra)  # type: ignore[arg-type]
    assert not got.requires_grad
    tol = 1e-5 if memory == "implicit" else 1e-12  # the proximal term moves it a little
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def plain_loop_values(task: Task, k: int) -> tuple[Tensor, None]:
    theta = task.theta0.detach()
    for batch in task.batches(k):
        with torch.enable_grad():
            leaf = theta.clone().requires_grad_()
            (g,) = torch.autograd.grad(task.reference_loss(leaf, batch), leaf)
        theta = theta - 0.3 * g
    return theta, None


@pytest.mark.parametrize("window", [0, 2, 5])
def test_truncated_is_the_last_window_of_the_plain_loop(window: int) -> None:
    task = Task()
    batches = task.batches(5)
    got = unroll(task.loss, task.theta0, batches, memory="truncated", window=window, lr=task.lr)
    theta = task.theta0
    for t, batch in enumerate(batches):  # the plain loop, cut where truncation cuts it
        if t == 5 - window:
            theta = theta.detach() + (task.theta0 - task.theta0.detach())
        with torch.set_grad_enabled(True):
            leaf = theta if t >= 5 - window else theta.detach().requires_grad_()
            (g,) = torch.autograd.grad(
                task.reference_loss(leaf, batch), leaf, create_graph=t >= 5 - window
            )
        theta = theta - (task.lr if t >= 5 - window else task.lr.detach()) * g
    torch.testing.assert_close(got, theta)
    got_grads = _grads(got, task)
    _close(got_grads, _grads(theta, task), 1e-10, 1e-12)
    if window == 5:
        full = unroll(task.loss, task.theta0, batches, memory="full", lr=task.lr)
        _close(got_grads, _grads(full, task), 1e-12, 1e-12)


def _ridge() -> tuple[ReparamModule, Tensor, Tensor, Tensor]:
    torch.manual_seed(0)
    r = ReparamModule(nn.Linear(4, 1).double())
    x = torch.randn(20, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(20, 1, dtype=torch.float64)
    theta0 = torch.randn(2, r.param_numel, dtype=torch.float64).requires_grad_()
    return r, x, y, theta0


def test_implicit_equals_the_converged_unroll_of_the_proximal_problem() -> None:
    """At the inner optimum the implicit gradient is the limit of the full unroll's."""
    r, x, y, theta0 = _ridge()
    prox, steps = 0.5, 300

    def loss(theta: Tensor, batch: Any) -> Tensor:  # a population: summed members
        return sum(F.mse_loss(r(batch[0], flat_param=t), batch[1]) for t in theta.unbind())  # type: ignore[return-value]

    def proximal(theta: Tensor, batch: Any) -> Tensor:
        return loss(theta, batch) + prox / 2 * (theta - batch[2]).square().sum()

    got = unroll(loss, theta0, [(x, y)] * steps, memory="implicit", prox=prox, lr=0.2)
    want = unroll(proximal, theta0, [(x, y, theta0)] * steps, memory="full", lr=0.2)
    torch.testing.assert_close(got, want)
    weights = torch.randn_like(got)
    _close(
        torch.autograd.grad((got * weights).sum(), [theta0, x]),
        torch.autograd.grad((want * weights).sum(), [theta0, x]),
        rtol=1e-6,
        atol=1e-8,
    )


def test_implicit_refuses_hyperparameters_that_require_grad() -> None:
    task = Task()
    with pytest.raises(ValueError, match="memory='implicit' differentiates at the inner optimum"):
        unroll(task.loss, task.theta0, task.batches(2), memory="implicit", prox=1.0, lr=task.lr)


def test_threads_each_get_their_own_unroll() -> None:
    task = Task()
    xs = [torch.randn(6, 1, 5, 5, dtype=torch.float64) for _ in range(4)]

    def one(x: Tensor) -> tuple[Tensor, Tensor]:
        theta0 = task.theta0.detach().clone().requires_grad_()
        out = unroll(task.loss, theta0, [(x, task.y)] * 4, lr=0.3, momentum=0.9)
        return out.detach(), torch.autograd.grad(out.square().sum(), theta0)[0]

    want = [one(x) for x in xs]
    got: list[Any] = [None] * 4
    threads = [
        threading.Thread(target=lambda i=i: got.__setitem__(i, one(xs[i]))) for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want, strict=True):
        _close(g, w, 0, 0)


def test_float32_relu_population_under_vmap_recomputes_exactly() -> None:
    """vmap's batching of a linear layer differs in the last bits with the input requiring
    grad or not, enough to flip a ReLU: the forward sweep must see what the recomputation sees
    (a false 'not a function of its inputs' refusal before)."""
    r = ReparamModule(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)))
    r.population_strategy = "vmap"
    torch.manual_seed(1)
    theta0 = r.fresh_flat_param(8)
    x = torch.randn(10, 64, requires_grad=True)
    y = torch.arange(10).repeat(8)

    def loss(theta: Tensor, xb: Tensor) -> Tensor:
        return F.cross_entropy(r(xb, flat_param=theta).flatten(0, 1), y, reduction="sum") / 10

    for _ in range(2):
        unroll(loss, theta0, [x] * 100, memory="checkpoint", lr=0.12).sum().backward()
    assert x.grad is not None


# ---- two-level checkpointing (inner_segment) ------------------------------------------------


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize(
    ("k", "segment", "inner"), [(1, 1, 1), (6, 3, 1), (13, 5, 2), (13, 4, 4), (20, 7, 3), (9, 9, 1)]
)
def test_two_level_checkpoint_equals_the_full_unroll_in_float64(
    opt: str, k: int, segment: int, inner: int
) -> None:
    task = Task()
    update, hyper = OPTIMIZERS[opt]
    batches = task.batches(k)
    full = unroll(task.loss, task.theta0, batches, optimizer=update, memory="full", lr=task.lr,
                  **hyper)  # fmt: skip
    got = unroll(task.loss, task.theta0, batches, optimizer=update, segment=segment,
                 inner_segment=inner, lr=task.lr, **hyper)  # fmt: skip
    torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-12)
    _close(_grads(got, task), _grads(full, task), rtol=1e-10, atol=1e-12)


def test_two_level_population_state_and_per_step_batches_equal_the_full_unroll() -> None:
    task = Task(population=3)
    xs = [torch.randn(6, 1, 5, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    batches = [(xs[t % 3], task.y) for t in range(11)]
    momentum = torch.randn_like(task.theta0).requires_grad_()

    def summed(theta: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
        return sum(task.loss(row, batch) for row in theta.unbind())  # type: ignore[return-value]

    res = {}
    for memory, extra in (("full", {}), ("checkpoint", {"segment": 4, "inner_segment": 1})):
        out = unroll(summed, task.theta0, batches, memory=memory, state=SGDState(momentum),
                     lr=task.lr, momentum=0.9, return_state=True, **extra)  # fmt: skip
        assert isinstance(out.state, SGDState)
        assert out.state.momentum_buffer is not None
        loss = (out.theta * torch.randn_like(out.theta, generator=torch.Generator().manual_seed(0))
                ).sum() + out.state.momentum_buffer.square().sum()  # fmt: skip
        res[memory] = (out.theta, *torch.autograd.grad(loss, [task.theta0, momentum, task.lr, *xs]))
    _close(res["checkpoint"], res["full"], 1e-10, 1e-12)


def test_two_level_threads_buffers_and_replays_dropout() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Tanh(),
                        nn.Linear(8, 1)).double()  # fmt: skip
    r = ReparamModule(net)
    x = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(16, 1, dtype=torch.float64)
    start = {k: v.clone() for k, v in net.named_buffers()}

    def loss(theta: Tensor, batch: Any, buffers: Any) -> tuple[Tensor, Any]:
        out, new = r.pure(batch[0], flat_param=theta, buffers=buffers)
        return F.mse_loss(out, batch[1]), new

    theta0 = r.flat_param.detach().clone().requires_grad_()
    res = {}
    for memory, extra in (("full", {}), ("checkpoint", {"segment": 3, "inner_segment": 1})):
        torch.manual_seed(1)
        got = unroll(loss, theta0, [(x, y)] * 8, memory=memory, buffers=start, lr=0.1,
                     return_state=True, **extra)  # fmt: skip
        after = torch.rand(1)  # the generator ends where the plain loop leaves it
        assert isinstance(got.buffers, dict)
        res[memory] = (got.theta, after, got.buffers["1.running_mean"],
                       *torch.autograd.grad(got.theta.sum(), [theta0, x]))  # fmt: skip
        assert got.buffers["1.num_batches_tracked"].item() == 8
    _close(res["checkpoint"], res["full"], 1e-10, 1e-12)


def test_two_level_refuses_a_loss_that_is_not_a_function_of_its_inputs() -> None:
    task = Task()
    gen = torch.Generator().manual_seed(0)

    def noisy(theta: Tensor, batch: Any) -> Tensor:
        noise = torch.randn(batch[0].shape, generator=gen, dtype=torch.float64)
        return task.loss(theta, (batch[0] + noise, batch[1]))

    out = unroll(noisy, task.theta0, task.batches(6), segment=3, inner_segment=1, lr=0.5)
    with pytest.raises(RuntimeError, match="gave another vector than the forward sweep"):
        out.sum().backward()


def _peak_mb(contender: str, k: int) -> subprocess.Popen[str]:
    """The benchmark's worker (peak RSS growth of one outer step, tuned glibc) on its medium
    net, in a fresh process."""
    env = {**os.environ, **TUNED_MALLOC}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.unroll", contender, str(k), "--medium"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_level_needs_less_memory_than_one_level_at_100_steps() -> None:
    """Peak RSS of one outer step with K=100, each mode in a fresh process: two levels
    (segment=10, inner_segment=1) below one level with the same stride and with segment=5."""
    names = ["checkpoint, segment=10, inner_segment=1", "checkpoint, segment=10",
             "checkpoint, segment=5"]  # fmt: skip
    running = [_peak_mb(name, 100) for name in names]
    peaks = []
    for proc in running:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        peaks.append(json.loads(out.strip().splitlines()[-1]))
    two_level, one_level, one_level_5 = peaks
    assert two_level < one_level, peaks
    assert two_level < one_level_5, peaks
