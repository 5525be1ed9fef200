"""The same checks on a CUDA device, when one is present (skipped cleanly otherwise)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import convbn, reference

from torchreparam import ReparamModule

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
