"""torch.compile without fullgraph: code after a graph break, compiled submodules and code that
dynamo leaves to eager all see the vector the caller bound (references: functional_call)."""

from __future__ import annotations

import asyncio
import copy
import gc
import weakref

import pytest
import torch
from conftest import reference
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounter

from torchreparam import ReparamModule
from torchreparam._inject import CHAIN


class Breaks(nn.Module):
    """Graph breaks of three kinds between two layers that read their weights."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.tanh(self.a(x))
        if self.kind == "graph_break":
            torch._dynamo.graph_break()
        elif self.kind == "item":
            if y.sum().item() > 1e9:  # a data-dependent branch: dynamo breaks here
                y = y * 2
        elif self.kind == "print":
            print(end="")
        return self.b(y) + self.a.bias.sum()


class Disabled(nn.Module):
    """A submodule dynamo leaves to eager (as Hugging Face marks some of its code)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)

    @torch.compiler.disable
    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


class WithDisabled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.d = Disabled()
        self.b = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.d(torch.tanh(self.a(x))))


def _build(factory):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    net = factory()
    twin = copy.deepcopy(net)
    return ReparamModule(net), twin, torch.randn(3, 4)


def _check(fn, r, twin, x, thetas) -> None:  # type: ignore[no-untyped-def]
    """Values and gradients w.r.t. each new vector equal functional_call's."""
    for theta in thetas:
        theta = theta.detach().clone().requires_grad_()
        ref = theta.detach().clone().requires_grad_()
        out = fn(theta)
        expected = reference(twin, r.layout, ref, (x,))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        out.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(theta.grad, ref.grad)
    assert CHAIN.top is None


KINDS = ["graph_break", "item", "print"]

# torch's dynamo warns when a tensor that is not a leaf (a view of the caller's vector, made by
# eager code) enters a compiled frame; torch.func.functional_call under compile warns alike.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"
)


@pytest.mark.parametrize("kind", KINDS)
def test_call_with_a_vector_across_graph_breaks(kind: str) -> None:
    r, twin, x = _build(lambda: Breaks(kind))
    counter = CompileCounter()
    f = torch.compile(lambda t: r(x, flat_param=t), backend=counter)
    _check(f, r, twin, x, [torch.randn(r.param_numel) for _ in range(3)])
    assert counter.frame_count >= 2  # it did break (and was compiled)


@pytest.mark.parametrize("kind", KINDS)
def test_unflattened_param_block_across_graph_breaks(kind: str) -> None:
    r, twin, x = _build(lambda: Breaks(kind))

    def body(t: Tensor) -> Tensor:
        with r.unflattened_param(t):
            return r.module(x)

    _check(torch.compile(body, backend="eager"), r, twin, x, [torch.randn(r.param_numel)] * 2)


def test_population_across_graph_breaks() -> None:
    r, twin, x = _build(lambda: Breaks("graph_break"))
    f = torch.compile(lambda ts: r(x, flat_param=ts), backend="eager")
    thetas = torch.randn(3, r.param_numel)
    expected = torch.stack([reference(twin, r.layout, t, (x,)) for t in thetas])
    torch.testing.assert_close(f(thetas), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_regional_compilation_of_a_submodule(kind: str) -> None:
    r, twin, x = _build(lambda: Breaks(kind))
    r.module.a.compile(backend="eager")
    r.module.b.compile(backend="eager")
    _check(lambda t: r(x, flat_param=t), r, twin, x, [torch.randn(r.param_numel)] * 2)
    torch.testing.assert_close(r.module(x), twin(x))  # the own weights again


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_wrapper_and_compiled_module(kind: str) -> None:
    r, twin, x = _build(lambda: Breaks(kind))
    r.compile(backend="eager")
    _check(lambda t: r(x, flat_param=t), r, twin, x, [torch.randn(r.param_numel)] * 2)
    r2, twin2, _ = _build(lambda: Breaks(kind))
    r2.module.compile(backend="eager")
    _check(lambda t: r2(x, flat_param=t), r2, twin2, x, [torch.randn(r2.param_numel)] * 2)


def test_eager_code_called_from_compiled_code_sees_the_traced_binding() -> None:
    r, twin, x = _build(WithDisabled)
    f = torch.compile(lambda t: r(x, flat_param=t), fullgraph=False, backend="eager")
    _check(f, r, twin, x, [torch.randn(r.param_numel) for _ in range(2)])


def test_own_weights_after_a_compiled_call_with_a_vector() -> None:
    r, twin, x = _build(lambda: Breaks("graph_break"))
    f = torch.compile(lambda t: r(x, flat_param=t), backend="eager")
    f(torch.randn(r.param_numel))
    torch.testing.assert_close(r(x), twin(x), rtol=0, atol=0)
    torch.testing.assert_close(r.module(x), twin(x), rtol=0, atol=0)


def test_asyncio_tasks_see_only_their_own_block() -> None:
    """A ``with`` block that spans an ``await`` is seen by its own task only (eager code)."""
    r, twin, x = _build(lambda: Breaks("none"))
    thetas = [torch.randn(r.param_numel) for _ in range(4)]

    async def member(i: int) -> tuple[Tensor, Tensor]:
        with r.unflattened_param(thetas[i]):  # (no torch.no_grad: it is per thread, not task)
            await asyncio.sleep(0)  # every task enters its block before any leaves it
            inside = r.module(x)
        await asyncio.sleep(0)
        return inside, r.module(x)

    async def main() -> list[tuple[Tensor, Tensor]]:
        return await asyncio.gather(*(member(i) for i in range(4)))

    results = asyncio.run(main())
    assert CHAIN.top is None  # every block restored its own task's chain
    for i, (inside, after) in enumerate(results):
        torch.testing.assert_close(inside, reference(twin, r.layout, thetas[i], (x,)))
        torch.testing.assert_close(after, twin(x))


def test_a_dropped_model_is_freed_without_garbage_collection() -> None:
    gc.disable()
    try:
        net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        r = ReparamModule(net)
        refs = [weakref.ref(r), weakref.ref(net), weakref.ref(r.flat_param)]
        del r, net
        assert [ref() for ref in refs] == [None, None, None]
    finally:
        gc.enable()


def test_the_unwrapped_module_outlives_its_wrapper() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    twin = copy.deepcopy(net)
    r = ReparamModule(net)
    del r
    gc.collect()
    x = torch.randn(3, 4)
    torch.testing.assert_close(net(x), twin(x), rtol=0, atol=0)
    net.double()
    twin.double()
    torch.testing.assert_close(net(x.double()), twin(x.double()), rtol=0, atol=0)
    state = net.state_dict()
    assert list(state) == list(twin.state_dict())
    clone = copy.deepcopy(net)
    torch.testing.assert_close(clone(x.double()), twin(x.double()), rtol=0, atol=0)
