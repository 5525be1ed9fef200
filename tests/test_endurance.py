"""Concurrency and endurance: many threads mixing every kind of call on one wrapper, and long
loops of calls (with and without ``create_graph``) that must not grow memory.

CI runs short versions; ``TORCHREPARAM_SLOW=1`` runs the full ones (8 threads x 1,000 calls,
10,000 calls per memory scenario). Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import zoo
from torch import Tensor, nn
from zoo import one_intra_op_thread  # noqa: F401 (a fixture)

from torchreparam import ReparamModule

SLOW = bool(os.environ.get("TORCHREPARAM_SLOW"))
THREADS = 8
CALLS_PER_THREAD = 1000 if SLOW else 100
MEMORY_CALLS = 10_000 if SLOW else 500
WARMUP = 200 if SLOW else 100

# torch: no batching rule for weight norm's kernel (a correct fallback, with a warning)
pytestmark = [
    pytest.mark.usefixtures("one_intra_op_thread"),
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]


def _vector(r: ReparamModule, *batch: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return r.flat_param.detach() + 0.3 * torch.randn(*batch, r.param_numel, generator=g)


def _grad_of(call: Callable[[Tensor], Tensor], theta: Tensor) -> tuple[Tensor, Tensor]:
    t = theta.clone().requires_grad_()
    out = call(t)
    out.square().sum().backward()
    return out.detach(), t.grad  # type: ignore[return-value]


class _Worker:
    """The calls of one thread, each with a serial reference computed before the threads run."""

    KINDS = ("single_grad", "population", "population_grad", "block", "pure", "per_member")

    def __init__(self, r: ReparamModule, x: Tensor, seed: int) -> None:
        self.r, self.x = r, x
        self.theta = _vector(r, seed=seed)
        self.thetas = _vector(r, 3, seed=seed + 100)
        self.xs = x.expand(3, *x.shape) * torch.arange(1.0, 4.0).view(3, 1, 1, 1, 1)
        for kind in self.KINDS:  # the first population call of a signature settles "auto"'s plan
            self.run(kind)
        self.expected = {kind: self.run(kind) for kind in self.KINDS}  # serial, this thread only

    def run(self, kind: str) -> tuple[Any, ...]:
        r, x = self.r, self.x
        if kind == "single_grad":
            return _grad_of(lambda t: r(x, flat_param=t), self.theta)
        if kind == "population_grad":
            return _grad_of(lambda t: r(x, flat_param=t), self.thetas)
        with torch.no_grad():
            if kind == "population":
                return (r(x, flat_param=self.thetas),)
            if kind == "block":
                with r.unflattened_param(self.theta):
                    return (r.module(x),)
            if kind == "pure":
                out, state = r.pure(x, flat_param=self.theta)
                return (out, *state.values())
            return (r(self.xs, flat_param=self.thetas, in_dims=0),)  # per-member inputs

    def check(self, kind: str) -> bool:
        got, expected = self.run(kind), self.expected[kind]
        return all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def _threaded(r: ReparamModule, x: Tensor, calls: int) -> tuple[int, list[Any]]:
    """THREADS workers and one caller of the module's own plain calls, all at once."""
    workers = [_Worker(r, x, seed=i) for i in range(THREADS)]
    with torch.no_grad():
        own = r(x)
    mismatches: list[Any] = []
    checked = [0] * (THREADS + 1)
    barrier = threading.Barrier(THREADS + 1)

    def work(i: int) -> None:
        barrier.wait()
        worker = workers[i]
        for k in range(calls):
            kind = _Worker.KINDS[(k + i) % len(_Worker.KINDS)]
            if not worker.check(kind):
                mismatches.append((i, k, kind))
            checked[i] += 1

    def plain() -> None:
        barrier.wait()
        for k in range(calls):
            with torch.no_grad():
                out = r.module(x) if k % 2 else r(x)
            if not torch.equal(out, own):
                mismatches.append(("own", k))
            checked[THREADS] += 1

    pool = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    pool.append(threading.Thread(target=plain))
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(checked), mismatches


def test_threads_mixing_every_kind_of_call() -> None:
    """Every thread gets exactly its serial results (single, population, per-member inputs,
    blocks, pure, with gradients), while the module's own plain calls run beside them."""
    r, x = zoo.composite()
    state = {k: v.clone() for k, v in r.state_dict().items()}
    checked, mismatches = _threaded(r, x, CALLS_PER_THREAD)
    print(f"\nthreads: {checked} calls checked against their serial results")
    assert mismatches == []
    assert checked == (THREADS + 1) * CALLS_PER_THREAD
    for key, value in r.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_threads_in_train_mode_with_their_own_buffers() -> None:
    """Train mode, each thread passing its own buffers: each thread's buffers end exactly as a
    serial run of its calls leaves them, the module's own untouched."""
    r, x = zoo.composite(train=True)
    own = {k: v.clone() for k, v in r.state_dict().items()}
    calls = CALLS_PER_THREAD // 4
    thetas = [_vector(r, seed=i) for i in range(THREADS)]
    inputs = [x * (1 + i / 10) for i in range(THREADS)]

    def run(i: int, buffers: list[Tensor]) -> Tensor:
        with torch.no_grad():
            return r(inputs[i], flat_param=thetas[i], buffers=buffers)

    expected_buffers, expected_out = [], []
    for i in range(THREADS):
        buffers = [b.clone() for b in r.module.buffers()]
        for _ in range(calls):
            out = run(i, buffers)
        expected_buffers.append(buffers)
        expected_out.append(out)
    results: list[Any] = [None] * THREADS

    def work(i: int) -> None:
        buffers = [b.clone() for b in own_buffers]
        for _ in range(calls):
            out = run(i, buffers)
        results[i] = (out, buffers)

    own_buffers = list(r.module.buffers())
    pool = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    for i in range(THREADS):
        out, buffers = results[i]
        assert torch.equal(out, expected_out[i])
        for a, b in zip(buffers, expected_buffers[i], strict=True):
            assert torch.equal(a, b)
    for key, value in r.state_dict().items():
        assert torch.equal(value, own[key]), key


# ---- memory ------------------------------------------------------------------------------
def rss() -> int:
    """Resident memory now, in bytes (VmRSS; the peak from getrusage where /proc is absent)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _live() -> tuple[int, int, int]:
    gc.collect()
    objects = gc.get_objects()
    tensors = sum(
        1 for o in objects if type(o) in (Tensor, nn.Parameter)
    )  # type(): no __class__ lookups
    return rss(), len(objects), tensors


def _scenarios() -> dict[str, Callable[[], Callable[[], None]]]:
    def single() -> Callable[[], None]:
        r, x = zoo.composite()
        theta = _vector(r, seed=1).requires_grad_()

        def step() -> None:
            r(x, flat_param=theta).square().sum().backward()
            theta.grad = None

        return step

    def maml(create_graph: bool) -> Callable[[], Callable[[], None]]:
        def make() -> Callable[[], None]:
            # torch: attention's CPU flash kernel has no second derivative: a model without it
            entry = zoo.BY_NAME["batchnorm2d_eval"]
            r, (x,) = zoo.wrap(entry), zoo.example(entry)
            theta0 = _vector(r, seed=2).requires_grad_()

            def step() -> None:
                (g,) = torch.autograd.grad(
                    r(x, flat_param=theta0).square().mean(), theta0, create_graph=create_graph
                )
                theta1 = theta0 - 0.01 * g
                r(x, flat_param=theta1).square().mean().backward()
                theta0.grad = None

            return step

        return make

    def population() -> Callable[[], None]:
        r, x = zoo.composite()
        thetas = _vector(r, 3, seed=3).requires_grad_()

        def step() -> None:
            r(x, flat_param=thetas).square().sum().backward()
            thetas.grad = None

        return step

    def optimizer() -> Callable[[], None]:
        r, x = zoo.composite(train=True)
        opt = torch.optim.SGD(r.parameters(), lr=1e-4)

        def step() -> None:
            opt.zero_grad()
            r(x).square().mean().backward()
            opt.step()

        return step

    def faults() -> Callable[[], None]:
        r, x = zoo.composite()
        theta = _vector(r, seed=4).requires_grad_()

        def boom(*_: Any) -> None:
            raise KeyError("fault")

        r.module.attn.register_forward_pre_hook(boom)

        def step() -> None:
            with contextlib.suppress(KeyError):
                r(x, flat_param=theta)

        return step

    return {
        "single": single,
        "maml_first_order": maml(False),
        "maml_create_graph": maml(True),
        "population": population,
        "optimizer_steps": optimizer,
        "faults": faults,
    }


SCENARIOS = _scenarios()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_no_memory_growth(scenario: str) -> None:
    """After a warm-up, MEMORY_CALLS more calls leave no more live tensors or Python objects
    behind, and resident memory grows by less than a small allocator slack."""
    step = SCENARIOS[scenario]()
    for _ in range(WARMUP):
        step()
    rss0, objects0, tensors0 = _live()
    for _ in range(MEMORY_CALLS):
        step()
    rss1, objects1, tensors1 = _live()
    print(
        f"\n{scenario}: {MEMORY_CALLS} calls: RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB "
        f"({(rss1 - rss0) / 2**10:+.0f} KiB), gc objects {objects1 - objects0:+d}, "
        f"tensors {tensors1 - tensors0:+d}"
    )
    assert tensors1 - tensors0 <= 0, "tensors accumulate across calls"
    assert objects1 - objects0 <= 50, "Python objects accumulate across calls"
    assert rss1 - rss0 < 16 * 2**20, "resident memory grows across calls"


@pytest.mark.skipif(not SLOW, reason="the full endurance run: TORCHREPARAM_SLOW=1")
@pytest.mark.slow
def test_memory_per_call_is_flat_over_the_long_run() -> None:
    """The long run again in two halves: the second half grows no more than the first."""
    step = SCENARIOS["maml_create_graph"]()
    for _ in range(WARMUP):
        step()
    rss0 = _live()[0]
    for _ in range(MEMORY_CALLS // 2):
        step()
    rss1 = _live()[0]
    for _ in range(MEMORY_CALLS // 2):
        step()
    rss2 = _live()[0]
    print(f"\nhalves: {(rss1 - rss0) / 2**10:+.0f} KiB, then {(rss2 - rss1) / 2**10:+.0f} KiB")
    assert rss2 - rss1 < 4 * 2**20
