"""``nn.DataParallel`` over a ReparamModule, against the one-device call and a plain twin.

Without GPUs, ``nn.DataParallel`` is a pass-through. Its multi-device path is emulated on the
CPU: the real ``DataParallel.forward``, ``torch.nn.parallel.replicate``, ``scatter_kwargs`` and
``gather`` run, with only their device-specific kernels substituted (the broadcast of the
parameters and buffers, the scatter and gather copies) and the replicas called in threads, as
``parallel_apply`` calls them. The substitutes keep what matters here: on the first device the
broadcast hands back the original tensors (detached) or views of them (with autograd), on the
others copies, differentiable back to the original. With CUDA, the real thing runs.
"""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.nn.parallel  # (loads the submodules below, found by their module names)
from torch import Tensor, nn
from torch.func import functional_call

from torchreparam import ReparamModule

REPLICATE = sys.modules["torch.nn.parallel.replicate"]
SCATTER_GATHER = sys.modules["torch.nn.parallel.scatter_gather"]


def _broadcast(
    tensors: Sequence[Tensor], devices: Sequence[Any], detach: bool = False
) -> list[list[Tensor]]:
    """``_broadcast_coalesced_reshape`` on one device: the originals (or views, with autograd)
    for the first device, copies for the others."""
    out = []
    for j in range(len(devices)):
        if j == 0:
            out.append([t if detach else t.view_as(t) for t in tensors])
        else:
            out.append([t.detach().clone() if detach else t.clone() for t in tensors])
    return out


class _Scatter:
    @staticmethod
    def apply(target_gpus: Sequence[Any], chunk_sizes: Any, dim: int, obj: Tensor) -> Any:
        return tuple(obj.chunk(len(target_gpus), dim))


class _Gather:
    @staticmethod
    def apply(target_device: Any, dim: int, *outputs: Tensor) -> Tensor:
        return torch.cat(outputs, dim)


def _parallel_apply(
    replicas: Sequence[nn.Module], inputs: Sequence[Any], kwargs: Sequence[dict[str, Any]]
) -> list[Any]:
    """The replicas called in threads (one call in this thread for one replica)."""
    results: list[Any] = [None] * len(replicas)
    grad = torch.is_grad_enabled()

    def work(i: int) -> None:
        torch.set_grad_enabled(grad)
        try:
            results[i] = replicas[i](*inputs[i], **kwargs[i])
        except BaseException as error:  # re-raised below, as parallel_apply does
            results[i] = error

    if len(replicas) == 1:
        work(0)
    else:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(replicas))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


@pytest.fixture
def emulate(monkeypatch: pytest.MonkeyPatch) -> Callable[[nn.Module, int], nn.DataParallel]:
    """``emulate(module, devices)``: a real ``nn.DataParallel`` over ``devices`` CPU 'devices'."""
    monkeypatch.setattr(REPLICATE, "_broadcast_coalesced_reshape", _broadcast)
    monkeypatch.setattr(REPLICATE, "_get_device_index", lambda device, *args, **kw: device)
    monkeypatch.setattr(SCATTER_GATHER, "Scatter", _Scatter)
    monkeypatch.setattr(SCATTER_GATHER, "Gather", _Gather)

    def make(module: nn.Module, devices: int) -> nn.DataParallel:
        dp = nn.DataParallel(module)
        dp.device_ids = list(range(devices))
        dp.output_device = 0
        dp.src_device_obj = torch.device("cpu")
        dp.dim = 0
        dp.parallel_apply = _parallel_apply  # type: ignore[method-assign]
        return dp

    return make


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def _theta(r: ReparamModule) -> Tensor:
    return (r.flat_param.detach() + 0.1 * torch.randn(r.param_numel)).requires_grad_()


def _load(twin: nn.Module, r: ReparamModule, theta: Tensor) -> None:
    """The plain twin's parameters set to ``theta``'s values."""
    with torch.no_grad():
        for name, value in r.layout.unflatten(theta.detach(), aliases=True).items():
            twin.get_parameter(name).copy_(value)


# ---- what replicate() makes ----------------------------------------------------------------
@pytest.mark.parametrize("grad", [True, False])
def test_each_replica_reads_its_own_flat_param_and_buffers(
    monkeypatch: pytest.MonkeyPatch, grad: bool
) -> None:
    """Each replica's copies differ here (as if corrupted in transit), so a replica that read
    the original's state (the state its submodules share with the original) would show it."""

    def broadcast(tensors: Sequence[Tensor], devices: Sequence[Any], detach: bool = False) -> Any:
        return [[t.detach() + 10.0 * (j + 1) for t in tensors] for j in range(len(devices))]

    monkeypatch.setattr(REPLICATE, "_broadcast_coalesced_reshape", broadcast)
    monkeypatch.setattr(REPLICATE, "_get_device_index", lambda device, *args, **kw: device)
    net = _bn_model()
    twin = copy.deepcopy(net).eval()
    r = ReparamModule(net).eval()
    x = torch.randn(6, 5)
    before = r(x)
    with torch.set_grad_enabled(grad):
        replicas = REPLICATE.replicate(r, [0, 1], not grad)
    for j, replica in enumerate(replicas):
        flat = r.flat_param.detach() + 10.0 * (j + 1)
        state = {
            **r.layout.unflatten(flat, aliases=True),
            **{n: b + 10.0 * (j + 1) for n, b in twin.named_buffers()},
        }
        expected = functional_call(twin, state, (x,))
        torch.testing.assert_close(replica(x), expected, rtol=0, atol=0)
        theta = _theta(r)
        row = theta.detach()[None]  # a (1, N) row: the one vector theta
        state.update(r.layout.unflatten(theta.detach(), aliases=True))
        expected = functional_call(twin, state, (x,))
        torch.testing.assert_close(replica(x, flat_param=row), expected, rtol=0, atol=0)
    torch.testing.assert_close(r(x), before, rtol=0, atol=0)  # the original is as it was
    assert all(
        sub.__dict__["_torchreparam_core"] is r._core
        for sub in r.module.modules()
        if "_torchreparam_core" in sub.__dict__
    )


# ---- DataParallel's whole call ---------------------------------------------------------------
@pytest.mark.parametrize("devices", [1, 2, 3])
def test_the_gathered_output_and_gradients_equal_the_one_device_call(
    emulate: Callable[[nn.Module, int], nn.DataParallel], devices: int
) -> None:
    r = ReparamModule(_model())
    dp = emulate(r, devices)
    x = torch.randn(7, 5, requires_grad=True)  # 7 rows: uneven pieces on 2 and 3 devices
    theta = _theta(r)
    out = dp(x, flat_param=theta.unsqueeze(0).expand(devices, -1))
    expected = r(x, flat_param=theta)
    assert out.shape == expected.shape == (7, 3)
    torch.testing.assert_close(out, expected)
    # first and second order, as trajectory matching differentiates through the inner steps
    cot = torch.randn(7, 3)
    (g_out,) = torch.autograd.grad((out * cot).sum(), theta, create_graph=True)
    (g_exp,) = torch.autograd.grad((expected * cot).sum(), theta, create_graph=True)
    torch.testing.assert_close(g_out, g_exp)
    (gx_out,) = torch.autograd.grad(g_out.square().sum(), x)
    (gx_exp,) = torch.autograd.grad(g_exp.square().sum(), x)
    torch.testing.assert_close(gx_out, gx_exp)


@pytest.mark.parametrize("devices", [1, 2, 3])
def test_the_modules_own_flat_param_through_data_parallel(
    emulate: Callable[[nn.Module, int], nn.DataParallel], devices: int
) -> None:
    r = ReparamModule(_model())
    dp = emulate(r, devices)
    x = torch.randn(6, 5)
    out = dp(x)
    expected = r(x)
    torch.testing.assert_close(out, expected)
    (g_out,) = torch.autograd.grad(out.square().sum(), r.flat_param)
    (g_exp,) = torch.autograd.grad(expected.square().sum(), r.flat_param)
    torch.testing.assert_close(g_out, g_exp)
    with torch.no_grad():  # replicate(detach=True): the first replica holds the Parameter
        torch.testing.assert_close(dp(x), expected.detach())


@pytest.mark.parametrize("devices", [1, 2, 3])
def test_batchnorm_in_train_mode_as_a_plain_twin_under_data_parallel(
    emulate: Callable[[nn.Module, int], nn.DataParallel], devices: int
) -> None:
    net = _bn_model()
    twin = copy.deepcopy(net)
    r = ReparamModule(net)
    theta = _theta(r)
    _load(twin, r, theta)
    x = torch.randn(8, 5)
    out = emulate(r, devices)(x, flat_param=theta.unsqueeze(0).expand(devices, -1))
    expected = emulate(twin, devices)(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for (name, mine), (_, theirs) in zip(
        r.module.named_buffers(), twin.named_buffers(), strict=True
    ):  # only the first device's updates are kept, in the original's buffers, as for the twin
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)


def test_trajectory_matching_inner_loop(
    emulate: Callable[[nn.Module, int], nn.DataParallel],
) -> None:
    """mtt-distillation's student: differentiable inner steps through DataParallel, the
    meta-gradient reaching the synthetic images and the learning rate."""

    def run(step: Callable[[Tensor, Tensor], Tensor], start: Tensor) -> tuple[Tensor, ...]:
        images = torch.randn(8, 5, generator=torch.Generator().manual_seed(1)).requires_grad_()
        labels = torch.arange(8) % 3
        lr = torch.tensor(0.1, requires_grad=True)
        params = [start.clone().requires_grad_()]
        for _ in range(3):
            loss = F.cross_entropy(step(images, params[-1]), labels)
            (grad,) = torch.autograd.grad(loss, params[-1], create_graph=True)
            params.append(params[-1] - lr * grad)
        meta = (params[-1] - start).square().sum()
        return (params[-1], *torch.autograd.grad(meta, [images, lr]))

    r = ReparamModule(_model())
    start = r.flat_param.detach().clone()
    dp = emulate(r, 2)
    got = run(lambda x, p: dp(x, flat_param=p.unsqueeze(0).expand(2, -1)), start)
    expected = run(lambda x, p: r(x, flat_param=p), start)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_a_population_with_per_member_inputs_spreads_over_the_devices(
    emulate: Callable[[nn.Module, int], nn.DataParallel],
) -> None:
    r = ReparamModule(_model())
    thetas = torch.randn(4, r.param_numel)
    xs = torch.randn(4, 6, 5)
    out = emulate(r, 2)(xs, flat_param=thetas, in_dims=0)
    torch.testing.assert_close(out, r(xs, flat_param=thetas, in_dims=0))


def test_a_population_with_shared_inputs_in_a_replica_is_refused(
    emulate: Callable[[nn.Module, int], nn.DataParallel],
) -> None:
    net = _bn_model()
    r = ReparamModule(net)
    before = {n: b.clone() for n, b in r.module.named_buffers()}
    thetas = torch.randn(4, r.param_numel)
    with pytest.raises(ValueError, match=r"DataParallel replica with shape \(2, "):
        emulate(r, 2)(torch.randn(6, 5), flat_param=thetas)
    for name, b in r.module.named_buffers():
        torch.testing.assert_close(b, before[name], rtol=0, atol=0)


def test_bad_rows_are_refused_as_for_a_single_call(
    emulate: Callable[[nn.Module, int], nn.DataParallel],
) -> None:
    r = ReparamModule(_model())
    with pytest.raises(ValueError, match=r"has shape \(1, 5\)"):
        emulate(r, 2)(torch.randn(6, 5), flat_param=torch.zeros(2, 5))
    with pytest.raises(TypeError, match=r"dtype torch\.float64"):
        emulate(r, 2)(
            torch.randn(6, 5), flat_param=torch.zeros(2, r.param_numel, dtype=torch.float64)
        )


def test_one_device_reads_the_row_as_one_vector_even_through_hooks(
    emulate: Callable[[nn.Module, int], nn.DataParallel],
) -> None:
    """On one device DataParallel calls the wrapper itself (no replica); nn.Module's longer call
    path (a hook) puts more frames between the two."""
    r = ReparamModule(_model())
    seen = []
    r.register_forward_pre_hook(lambda module, args: seen.append(len(args)))
    theta, x = _theta(r), torch.randn(6, 5)
    out = emulate(r, 1)(x, flat_param=theta[None])
    torch.testing.assert_close(out, r(x, flat_param=theta), rtol=0, atol=0)
    assert seen == [1, 1]


def test_outside_data_parallel_a_row_stays_a_population_of_one(
    emulate: Callable[[nn.Module, int], nn.DataParallel],
) -> None:
    r = ReparamModule(_model())
    theta, x = _theta(r), torch.randn(6, 5)
    assert r(x, flat_param=theta[None]).shape == (1, 6, 3)

    class Outer(nn.Module):  # DataParallel over another module, which calls r with a row
        def __init__(self) -> None:
            super().__init__()
            self.inner = r

        def forward(self, x: Tensor, theta: Tensor) -> Tensor:
            return self.inner(x, flat_param=theta[None])

    out = emulate(Outer(), 1)(x, theta)
    assert out.shape == (1, 6, 3)
    # without devices (no GPU) DataParallel splits nothing: (2, N) is a population of two
    dp = nn.DataParallel(r)
    dp.device_ids = []
    assert dp(x, flat_param=theta.expand(2, -1)).shape == (2, 6, 3)


@pytest.mark.parametrize("grad", [True, False])
def test_frozen_parameters_outside_flat_param(
    emulate: Callable[[nn.Module, int], nn.DataParallel], grad: bool
) -> None:
    """include="trainable": the frozen weights stay ordinary parameters, which replicate() sets
    on the copies (under no_grad, the original Parameter objects on the first device)."""
    net = _model()
    net[0].requires_grad_(False)
    r = ReparamModule(net, include="trainable")
    theta, x = _theta(r), torch.randn(6, 5)
    with torch.set_grad_enabled(grad):
        out = emulate(r, 2)(x, flat_param=theta.unsqueeze(0).expand(2, -1))
        torch.testing.assert_close(out, r(x, flat_param=theta))


def test_replicas_of_a_wrapper_inside_a_larger_model(
    emulate: Callable[[nn.Module, int], nn.DataParallel],
) -> None:
    r = ReparamModule(_bn_model()).eval()
    model = nn.Sequential(r, nn.Linear(3, 2))
    x = torch.randn(6, 5)
    torch.testing.assert_close(emulate(model, 3)(x), model(x))


# ---- real GPUs -------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_data_parallel_on_every_gpu() -> None:
    ngpu = torch.cuda.device_count()
    torch.manual_seed(0)
    net = _bn_model().cuda()
    twin = copy.deepcopy(net)
    r = ReparamModule(net)
    dp = nn.DataParallel(r)
    x = torch.randn(8 * ngpu, 5, device="cuda", requires_grad=True)
    theta = (r.flat_param.detach() + 0.1 * torch.randn_like(r.flat_param)).requires_grad_()
    tight = {"rtol": 1e-4, "atol": 1e-5}  # (kernels may differ with the batch size)

    r.eval()  # eval: the one-device call is the reference
    out = dp(x, flat_param=theta.unsqueeze(0).expand(ngpu, -1))
    expected = r(x, flat_param=theta)
    assert out.shape == expected.shape == (8 * ngpu, 3)
    torch.testing.assert_close(out, expected, **tight)
    (g_out,) = torch.autograd.grad(out.square().sum(), theta, create_graph=True)
    (g_exp,) = torch.autograd.grad(expected.square().sum(), theta, create_graph=True)
    torch.testing.assert_close(g_out, g_exp, **tight)
    (gx_out,) = torch.autograd.grad(g_out.square().sum(), x)
    (gx_exp,) = torch.autograd.grad(g_exp.square().sum(), x)
    torch.testing.assert_close(gx_out, gx_exp, **tight)
    torch.testing.assert_close(dp(x), r(x), **tight)

    r.train()  # train: a plain twin under DataParallel is the reference
    twin.train()
    _load(twin, r, theta)
    out = dp(x, flat_param=theta.unsqueeze(0).expand(ngpu, -1))
    torch.testing.assert_close(out, nn.DataParallel(twin)(x), **tight)
    for (name, mine), (_, theirs) in zip(
        r.module.named_buffers(), twin.named_buffers(), strict=True
    ):
        torch.testing.assert_close(mine, theirs, **tight, msg=name)
