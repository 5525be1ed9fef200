"""Several threads share one wrapper, each with its own vector: each gets its own results."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from conftest import build

from torchreparam import ReparamModule


def test_threads_with_their_own_vectors_get_their_own_results_and_gradients() -> None:
    r, _, (x,) = build("convbn")
    r.eval()
    threads, calls = 6, 60
    thetas = [torch.randn(r.param_numel) for _ in range(threads)]
    serial = []
    for theta in thetas:  # the serial reference: one call per vector, no threads
        t = theta.clone().requires_grad_()
        out = r(x, flat_param=t)
        out.square().sum().backward()
        serial.append((out.detach(), t.grad))
    own = r(x).detach()
    mismatches = []
    barrier = threading.Barrier(threads + 1)

    def worker(i: int) -> None:
        barrier.wait()
        for k in range(calls):
            t = thetas[i].clone().requires_grad_()
            out = r(x, flat_param=t)
            out.square().sum().backward()
            if not (torch.equal(out.detach(), serial[i][0]) and torch.equal(t.grad, serial[i][1])):
                mismatches.append((i, k))

    def plain_caller() -> None:  # the module's own plain calls, interleaved
        barrier.wait()
        for k in range(calls):
            if not torch.equal(r.module(x).detach(), own):
                mismatches.append(("own", k))

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    pool.append(threading.Thread(target=plain_caller))
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert mismatches == []


def test_threads_using_the_context_manager() -> None:
    r, _, (x,) = build("mlp")
    thetas = [torch.randn(r.param_numel) for _ in range(4)]
    expected = [r(x, flat_param=t) for t in thetas]
    errors = []

    def worker(i: int) -> None:
        for _ in range(100):
            with r.unflattened_param(thetas[i]):
                if not torch.equal(r.module(x), expected[i]):
                    errors.append(i)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert errors == []


def _make(width: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(16, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
        torch.nn.Tanh(), torch.nn.Linear(width, 4),
    )  # fmt: skip


_Call = Callable[[torch.nn.Module, "ReparamModule | None", torch.Tensor], torch.Tensor]


def _lost_gradient(calls: list[_Call], threads: int = 4, passes: int = 3) -> bool:
    """One trial: threads each run backward passes (``calls`` in turn); whether flat_param.grad
    (or a leaf's .grad, its view) differs from the sum of the same passes on a plain twin."""
    net, twin = _make(512), _make(512)
    twin.load_state_dict(net.state_dict())
    r = ReparamModule(net)
    list(net.parameters())  # the leaves exist from the start
    xs = [torch.randn(32, 16) for _ in range(threads * passes)]
    for j, x in enumerate(xs):
        calls[j % len(calls)](twin, None, x).square().sum().backward()
    barrier = threading.Barrier(threads)

    def work(i: int) -> None:
        barrier.wait()
        for j in range(i * passes, (i + 1) * passes):
            calls[j % len(calls)](net, r, xs[j]).square().sum().backward()

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    want = torch.cat([p.grad.reshape(-1) for p in twin.parameters()])
    leaves = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    got = r.flat_param.grad
    return not (torch.allclose(got, want, rtol=1e-5, atol=1e-5) and torch.equal(leaves, got))


def test_concurrent_backward_passes_through_the_module_and_the_wrapper_lose_nothing() -> None:
    # Passes through the unwrapped module, the wrapper, submodules called on their own, and
    # weights used in the test's own code: flat_param.grad (and each leaf's .grad, its views)
    # must be the sum of every pass, as on a plain module. (When gradients through the module were
    # accumulated through the leaves, 10 to 23 of 100 such trials lost part of a gradient:
    # the leaves and flat_param were accumulated under two different locks.)
    calls: list[_Call] = [
        lambda m, r, x: m(x),
        lambda m, r, x: (r if r is not None else m)(x),
        lambda m, r, x: m[4](m[3](m[2](m[1](m[0](x))))),  # submodules called on their own
        lambda m, r, x: m[2:](torch.nn.functional.linear(x, m[0].weight, m[0].bias).tanh()),
    ]
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # (one thread per op: the passes overlap the most)
    try:
        lost = [trial for trial in range(15) if _lost_gradient(calls)]
    finally:
        torch.set_num_threads(before)
    assert lost == []
