"""Several threads share one wrapper, each with its own vector: each gets its own results."""

from __future__ import annotations

import threading

import torch
from conftest import build


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
