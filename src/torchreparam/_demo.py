"""``python -m torchreparam demo``: the original README's example, on the CPU, with checks."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ._module import ReparamModule
from ._resnet import resnet18

__all__ = ["run_demo"]

T = TypeVar("T")


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _median_time(fn: Callable[[], T], repeats: int = 5) -> tuple[T, float]:
    """``fn()`` once to warm up, then the median time of ``repeats`` calls."""
    out = fn()
    times = []
    for _ in range(repeats):
        out, seconds = _timed(fn)
        times.append(seconds)
    return out, sorted(times)[len(times) // 2]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def maml_loss(
    reparam_net: ReparamModule,
    theta_0: Tensor,
    inner_train: tuple[Tensor, Tensor],
    inner_val: tuple[Tensor, Tensor],
    num_gd_steps: int = 5,
    lr: float = 0.01,
) -> Tensor:
    """The original README's MAML loss: inner SGD steps on ``theta``, then a validation loss."""
    train_data, train_label = inner_train
    theta = theta_0
    for _ in range(num_gd_steps):
        loss = F.cross_entropy(reparam_net(train_data, flat_param=theta), train_label)
        (gtheta,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta = theta - lr * gtheta
    val_data, val_label = inner_val
    return F.cross_entropy(reparam_net(val_data, flat_param=theta), val_label)


def run_demo(
    *, quick: bool = False, image_size: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Run the demo, print a few lines, and return what it measured (for tests)."""
    torch.manual_seed(seed)
    size = image_size or (64 if quick else 224)
    say = print
    say(
        f"torchreparam demo: the original README's example on the CPU "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads, images {size}x{size})"
    )
    net, source = resnet18()
    reference = copy.deepcopy(net)  # an unwrapped twin to check against
    reparam_net, wrap_s = _timed(lambda: ReparamModule(net))
    only_flat = tuple(reparam_net.parameters()) == (reparam_net.flat_param,)
    mib = reparam_net.flat_param.numel() * reparam_net.flat_param.element_size() / 2**20
    say(
        f"  wrap     ResNet-18 from {source}: {reparam_net.param_numel:,} parameters in one "
        f"flat vector ({mib:.1f} MiB), wrapped in {_ms(wrap_s)}; only parameter is flat_param: "
        f"{only_flat}"
    )

    image = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected, plain_s = _median_time(lambda: reference(image))
        got, wrapped_s = _median_time(lambda: reparam_net(image))
    equal = torch.equal(got, expected)
    say(
        f"  equal    reparam_net(x) == net(x) bit for bit: {equal} "
        f"(class 746: {got[0, 746].item():.4f} vs {expected[0, 746].item():.4f}; "
        f"median forward: plain {_ms(plain_s)}, wrapped {_ms(wrapped_s)})"
    )

    theta = torch.randn_like(reparam_net.flat_param).mul_(0.01)
    with torch.no_grad():
        via_theta, theta_s = _median_time(lambda: reparam_net(image, flat_param=theta))
        params = reparam_net.layout.unflatten(theta)
        via_func = torch.func.functional_call(reference, params, (image,))
    theta_diff = (via_theta - via_func).abs().max().item()
    say(
        f"  theta    reparam_net(x, flat_param=theta) vs torch.func.functional_call: "
        f"max |diff| {theta_diff:.1e} (median forward {_ms(theta_s)})"
    )

    with warnings.catch_warnings():
        # torch notes that BatchNorm's train-mode batch-size check is data-dependent while
        # tracing; it is benign here (the traced graph is re-used with the same batch size).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced, trace_s = _timed(lambda: reparam_net.trace(image))
    with torch.no_grad():
        via_trace, traced_s = _median_time(lambda: traced(image))
        untraced = reparam_net.module(image)
    trace_diff = (via_trace - untraced).abs().max().item()
    say(
        f"  trace    traced vs untraced output: max |diff| {trace_diff:.1e} "
        f"(traced in {_ms(trace_s)}, median traced forward {_ms(traced_s)})"
    )

    theta_0 = torch.randn_like(reparam_net.flat_param).mul_(0.001).requires_grad_()
    inner_train = (torch.randn(2, 3, size, size), torch.randint(0, 1000, (2,)))
    inner_val = (torch.randn(5, 3, size, size), torch.randint(0, 1000, (5,)))
    loss, maml_s = _timed(lambda: maml_loss(reparam_net, theta_0, inner_train, inner_val))
    _, backward_s = _timed(loss.backward)
    grad = theta_0.grad
    assert grad is not None  # backward of a loss that depends on theta_0 fills it
    nonzero = int((grad != 0).sum())
    say(
        f"  maml     5 inner SGD steps (create_graph=True), outer loss {loss.item():.3f}; "
        f"theta_0.grad: norm {grad.norm().item():.2e}, {nonzero:,}/{grad.numel():,} nonzero "
        f"(forward {_ms(maml_s)}, backward {_ms(backward_s)})"
    )
    return {
        "only_flat": only_flat,
        "equal": equal,
        "theta_diff": theta_diff,
        "trace_diff": trace_diff,
        "grad_norm": grad.norm().item(),
        "grad_nonzero": nonzero,
        "param_numel": reparam_net.param_numel,
    }
