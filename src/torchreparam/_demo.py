"""``python -m torchreparam demo``: what the library is for, each claim checked as it prints.

First a small MLP: wrapping changes nothing, a call with another vector equals
``torch.func.functional_call``, a population of vectors runs in one call (timed against the
loop), a call that raises leaves the model as it was, threads each get their own result. Then
a ResNet-18 through the steps of the original project's example: wrap, the same output, trace,
and a MAML meta-gradient through five inner SGD steps.
"""

from __future__ import annotations

import copy
import os
import statistics
import textwrap
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._module import ReparamModule
from ._resnet import resnet18

__all__ = ["maml_loss", "run_demo"]

T = TypeVar("T")
WIDTH = 99  # every printed line is shorter than 100 characters
POPULATION = 64
THREADS = 4


def say(label: str, text: str) -> None:
    """Print ``text`` after ``label``, wrapped to lines under 100 characters."""
    print(textwrap.fill(text, WIDTH, initial_indent=f"  {label:<11}", subsequent_indent=" " * 13))


def _ms(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.1f} s"
    return f"{seconds * 1e3:.2f} ms" if seconds < 0.01 else f"{seconds * 1e3:.0f} ms"


def _timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _median_time(fn: Callable[[], T], repeats: int) -> tuple[T, float]:
    """``fn()`` once to warm up, then the median time of ``repeats`` calls."""
    out = fn()
    times = []
    for _ in range(repeats):
        out, seconds = _timed(fn)
        times.append(seconds)
    return out, statistics.median(times)


def _paired(base: Callable[[], object], other: Callable[[], object], repeats: int) -> str:
    """Both timed in alternation; medians, and the spread of the per-repeat speed-ups."""
    base(), other()  # warm-up (the population's first call also picks its strategy)
    pairs = [(_timed(base)[1], _timed(other)[1]) for _ in range(repeats)]
    ratios = sorted(b / o for b, o in pairs)
    base_s = statistics.median(b for b, _ in pairs)
    other_s = statistics.median(o for _, o in pairs)
    return (
        f"median over {repeats} repeats: loop {_ms(base_s)}, one call {_ms(other_s)}, "
        f"{statistics.median(ratios):.1f}x faster (per repeat {ratios[0]:.1f}x-{ratios[-1]:.1f}x)"
    )


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)
    )


def _small_model(repeats: int) -> dict[str, Any]:
    net = _mlp()
    plain = copy.deepcopy(net)  # the plain model, never wrapped
    r = ReparamModule(net)
    x = torch.randn(32, 16)
    only_flat = tuple(r.parameters()) == (r.flat_param,)
    with torch.no_grad():
        equal = torch.equal(r(x), plain(x))
    say(
        "wrap",
        f"r = ReparamModule(net): the MLP's {r.param_numel:,} weights live in r.flat_param, its "
        f"only parameter: {only_flat}; r(x) equals the plain model's output bit for bit: {equal}",
    )
    theta = 0.1 * torch.randn(r.param_numel)
    with torch.no_grad():
        got = r(x, flat_param=theta)
        expected = torch.func.functional_call(plain, r.layout.unflatten(theta), (x,))
    theta_diff = (got - expected).abs().max().item()
    say(
        "vector",
        f"r(x, flat_param=theta) vs torch.func.functional_call(net, dict of theta's slices, x): "
        f"max |diff| {theta_diff:.1e}",
    )
    thetas = theta + 0.01 * torch.randn(POPULATION, r.param_numel)  # (P, N)
    with torch.no_grad():
        one_call = r(x, flat_param=thetas)  # (P, 32, 4)
        loop = torch.stack([r(x, flat_param=t) for t in thetas])
        timing = _paired(
            lambda: [r(x, flat_param=t) for t in thetas],
            lambda: r(x, flat_param=thetas),
            repeats,
        )
    population_diff = (one_call - loop).abs().max().item()
    say(
        "population",
        f"r(x, flat_param=thetas) with thetas of shape {tuple(thetas.shape)} runs the "
        f"{POPULATION} vectors in one call; vs a loop of single calls: max |diff| "
        f"{population_diff:.1e}; {timing}",
    )
    return {
        "only_flat": only_flat,
        "equal": equal,
        "theta_diff": theta_diff,
        "population_diff": population_diff,
        "threads_ok": _threads(r, x, thetas[:THREADS]),
        "unchanged": _failure(),
    }


def _threads(r: ReparamModule, x: Tensor, thetas: Tensor, calls: int = 50) -> bool:
    with torch.no_grad():
        expected = [r(x, flat_param=t) for t in thetas]

        def work(i: int) -> int:
            return sum(torch.equal(r(x, flat_param=thetas[i]), expected[i]) for _ in range(calls))

        with ThreadPoolExecutor(len(thetas)) as pool:
            own = sum(pool.map(work, range(len(thetas))))
    total = calls * len(thetas)
    say(
        "threads",
        f"{len(thetas)} threads call the same r at once, each with its own vector, {calls} "
        f"times each: {own}/{total} calls returned their own vector's output",
    )
    return own == total


def _failure() -> bool:
    net = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    r = ReparamModule(net)  # train mode: BatchNorm updates its running statistics

    def fail(*_: object) -> None:
        raise RuntimeError("a layer failed")

    before = {k: v.clone() for k, v in r.state_dict().items()}
    handle = net[2].register_forward_pre_hook(fail)  # net is r.module, wrapped in place
    try:
        r(torch.randn(8, 16), flat_param=torch.randn(r.param_numel))
    except RuntimeError as e:
        raised = f"{type(e).__name__}: {e}"
    else:
        raised = "nothing"
    finally:
        handle.remove()
    after = r.state_dict()
    unchanged = after.keys() == before.keys() and all(
        torch.equal(before[k], after[k]) for k in after
    )
    say(
        "failure",
        f"a call with another vector whose last layer raises ({raised}), after BatchNorm ran: "
        f"weights and BatchNorm statistics are as before, bit for bit: {unchanged}",
    )
    return unchanged


def maml_loss(
    reparam_net: ReparamModule,
    theta_0: Tensor,
    inner_train: tuple[Tensor, Tensor],
    inner_val: tuple[Tensor, Tensor],
    num_gd_steps: int = 5,
    lr: float = 0.01,
) -> Tensor:
    """MAML's outer loss: ``num_gd_steps`` SGD steps from ``theta_0``, then a validation loss."""
    train_data, train_label = inner_train
    theta = theta_0
    for _ in range(num_gd_steps):
        loss = F.cross_entropy(reparam_net(train_data, flat_param=theta), train_label)
        (gtheta,) = torch.autograd.grad(loss, theta, create_graph=True)
        theta = theta - lr * gtheta
    val_data, val_label = inner_val
    return F.cross_entropy(reparam_net(val_data, flat_param=theta), val_label)


def _resnet(size: int, repeats: int) -> dict[str, Any]:
    net, source = resnet18()
    plain = copy.deepcopy(net)
    reparam_net, wrap_s = _timed(lambda: ReparamModule(net))
    mib = reparam_net.flat_param.numel() * reparam_net.flat_param.element_size() / 2**20
    say(
        "resnet18",
        f"ResNet-18 from {source}: {reparam_net.param_numel:,} parameters in one flat vector "
        f"({mib:.1f} MiB), wrapped in {_ms(wrap_s)}",
    )
    image = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected, plain_s = _median_time(lambda: plain(image), repeats)
        got, wrapped_s = _median_time(lambda: reparam_net(image), repeats)
    equal = torch.equal(got, expected)
    say(
        "same",
        f"class 746: {got[0, 746].item():.4f} wrapped, {expected[0, 746].item():.4f} plain; "
        f"equal bit for bit: {equal} (median forward of {repeats}: plain {_ms(plain_s)}, "
        f"wrapped {_ms(wrapped_s)})",
    )
    with warnings.catch_warnings():
        # torch notes that train-mode BatchNorm's batch-size check is data-dependent while
        # tracing; benign here (the traced graph runs again with the same batch size)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced, trace_s = _timed(lambda: reparam_net.trace(image))
    with torch.no_grad():
        trace_diff = (traced(image) - reparam_net(image)).abs().max().item()
    say("trace", f"reparam_net.trace(image), {_ms(trace_s)}: max |diff| {trace_diff:.1e}")
    theta_0 = torch.randn_like(reparam_net.flat_param).mul_(0.001).requires_grad_()
    inner_train = (torch.randn(2, 3, size, size), torch.randint(0, 1000, (2,)))
    inner_val = (torch.randn(5, 3, size, size), torch.randint(0, 1000, (5,)))
    loss, maml_s = _timed(lambda: maml_loss(reparam_net, theta_0, inner_train, inner_val))
    _, backward_s = _timed(loss.backward)
    grad = theta_0.grad
    assert grad is not None  # backward of a loss that depends on theta_0 fills it
    nonzero = int((grad != 0).sum())
    say(
        "maml",
        f"5 inner SGD steps on theta (create_graph=True), then loss.backward(): theta_0.grad "
        f"has norm {grad.norm().item():.2e}, {nonzero:,} of {grad.numel():,} entries nonzero "
        f"(inner loop {_ms(maml_s)}, backward {_ms(backward_s)})",
    )
    return {
        "resnet_equal": equal,
        "trace_diff": trace_diff,
        "grad_norm": grad.norm().item(),
        "grad_nonzero": nonzero,
        "param_numel": reparam_net.param_numel,
    }


def run_demo(
    *, quick: bool = False, image_size: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Run the demo, print its lines, and return what it measured and checked (for tests)."""
    torch.manual_seed(seed)
    # a single train-mode image needs >1 value per channel after ResNet-18's last stage: >= 33
    size = image_size or (64 if quick else 224)
    repeats = 7 if quick else 15
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torchreparam demo on the CPU: torch {torch.__version__}, one thread (as the benchmarks)"
    )
    busy = (
        "a busy machine: timings vary from run to run, the checks do not"
        if load > cores / 2
        else ""
    )
    say("machine", f"load {load:.1f} on {cores} cores{'; ' + busy if busy else ''}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small calls measure overhead; more threads only add their sync
    try:
        results = _small_model(repeats)
        results |= _resnet(size, 3 if quick else 5)
    finally:
        torch.set_num_threads(threads)
    checks = ("only_flat", "equal", "unchanged", "threads_ok", "resnet_equal")
    results["ok"] = all(results[k] for k in checks) and results["grad_nonzero"] > 0
    results["ok"] = results["ok"] and results["theta_diff"] == 0 and results["trace_diff"] < 1e-4
    return results
