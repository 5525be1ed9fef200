"""The same checks on a CUDA device, when one is present (skipped cleanly otherwise)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import convbn, reference

from torchreparam import ReparamModule, unroll

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def test_cuda_parity_gradients_and_moves() -> None:
    net = convbn().cuda()
    twin = copy.deepcopy(net)
    r = ReparamModule(net)
    assert r.flat_param.is_cuda
    x = torch.randn(2, 3, 5, 5, device="cuda")
    torch.testing.assert_close(r(x), twin(x))
    theta = torch.randn(r.param_numel, device="cuda", requires_grad=True)
    ref = theta.detach().clone().requires_grad_()
    out = r(x, flat_param=theta)
    expected = reference(twin, r.layout, ref, (x,))
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(theta.grad, ref.grad)
    with pytest.raises(
        ValueError, match="flat_param is on cpu but the module's parameters are on cuda"
    ):
        r(x, flat_param=torch.zeros(r.param_numel))
    r.cpu()
    assert r.module[0].weight.device.type == "cpu"
    torch.testing.assert_close(r(x.cpu()), twin.cpu()(x.cpu()))


def test_cuda_unroll_checkpoint_replays_dropout_and_equals_full() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1)
    ).cuda()
    r = ReparamModule(net)
    x = torch.randn(8, 3, device="cuda", requires_grad=True)
    y = torch.randn(8, 1, device="cuda")
    theta0 = r.flat_param.detach().clone().requires_grad_()
    grads = {}
    for memory in ("full", "checkpoint"):
        torch.manual_seed(1)
        out = unroll(
            lambda t, b: ((r(b[0], flat_param=t) - b[1]) ** 2).mean(),
            theta0,
            [(x, y)] * 5,
            memory=memory,
            lr=0.1,
            momentum=0.9,
        )
        grads[memory] = torch.autograd.grad(out.square().sum(), [theta0, x])
    for got, want in zip(grads["checkpoint"], grads["full"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
