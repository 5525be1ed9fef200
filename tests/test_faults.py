"""Faults injected at every stage of a call leave the module bit-identical, and the next call works.

Stages: input validation; inside forward (a hook raising before or after every submodule, in
every kind of call: single, with buffers, the unwrapped module, context managers, ``pure``,
populations by every strategy, ``torch.func`` transforms, nested bindings); inside backward;
inside ``vmap``; at one member of a population; in several threads at once; while loading a
state dict; while tracing; while wrapping (the model is left as it was). After each: the ``unchanged`` guard (the same ``flat_param``,
state dicts bit-identical, no binding left, outputs equal to a copy taken before), then normal
calls (own weights and another vector, values and gradients) equal a copy's.

Each test case injects one fault (the thread test injects many): the number of faults is the
number of cases, plus the thread test's count.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import zoo
from conftest import unchanged
from torch import Tensor, nn
from zoo import one_intra_op_thread  # noqa: F401 (a fixture)

from torchreparam import ReparamModule, StateDictMismatchError
from torchreparam._inject import innermost

# torch: no batching rule for weight norm's kernel (a correct fallback, with a warning)
pytestmark = [
    pytest.mark.usefixtures("one_intra_op_thread"),
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]


class Injected(Exception):
    """The fault."""


class InjectedBase(BaseException):
    """A fault that is not an ``Exception`` (as ``KeyboardInterrupt``)."""


def _firing_order() -> list[tuple[str, str]]:
    """Every hook point of the composite model, in the order a call reaches them."""
    r, x = zoo.composite()
    order: list[tuple[str, str]] = []
    handles = []
    for name, module in r.module.named_modules():
        handles.append(
            module.register_forward_pre_hook(lambda *_, n=name: order.append(("before", n)))
        )
        handles.append(module.register_forward_hook(lambda *_, n=name: order.append(("after", n))))
    r(x)
    for handle in handles:
        handle.remove()
    return order


POINTS = _firing_order()
POINT_IDS = [f"{when}-{name or 'root'}" for when, name in POINTS]
AFTER_BATCHNORM = POINTS[POINTS.index(("after", "bn")) :]


def _theta(r: ReparamModule, *batch: int, seed: int = 5) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(*batch, r.param_numel, generator=g)
    return (r.flat_param.detach() + 0.2 * noise).requires_grad_()


@contextmanager
def fault_at(r: ReparamModule, point: tuple[str, str], error: BaseException) -> Iterator[None]:
    """Within the block, every call of the module raises ``error`` at ``point``."""
    when, name = point
    module = r.module.get_submodule(name)

    def pre(*_: Any) -> None:
        raise error

    def post(*_: Any) -> None:
        raise error

    handle = (
        module.register_forward_pre_hook(pre)
        if when == "before"
        else module.register_forward_hook(post)
    )
    try:
        yield
    finally:
        handle.remove()


def normal_calls_work(r: ReparamModule, twin: ReparamModule, x: Tensor) -> None:
    """After a fault: own weights and another vector, values and gradients, equal a copy's."""
    assert innermost(r._core) is None
    assert not torch._C._are_functorch_transforms_active()
    torch.testing.assert_close(r(x), twin(x), rtol=0, atol=0)
    theta, theta2 = _theta(r, seed=9), _theta(twin, seed=9)
    out, expected = r(x, flat_param=theta), twin(x, flat_param=theta2)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(theta.grad, theta2.grad, rtol=0, atol=0)
    thetas = _theta(r, 2, seed=10)
    torch.testing.assert_close(r(x, flat_param=thetas), twin(x, flat_param=thetas.detach()))


@contextmanager
def guarded(r: ReparamModule, x: Tensor) -> Iterator[None]:
    """The ``unchanged`` guard, then normal calls against a copy taken before."""
    twin = copy.deepcopy(r)
    with unchanged(r, x):
        yield
    normal_calls_work(r, twin, x)


# ---- inside forward, in every kind of call -----------------------------------------------
def _own(r: ReparamModule, x: Tensor) -> Any:
    return r(x)


def _theta_call(r: ReparamModule, x: Tensor) -> Any:
    return r(x, flat_param=_theta(r))


def _theta_buffers(r: ReparamModule, x: Tensor) -> Any:
    return r(x, flat_param=_theta(r), buffers=tuple(b.clone() + 1 for b in r.module.buffers()))


def _module(r: ReparamModule, x: Tensor) -> Any:
    return r.module(x)


def _unflattened(r: ReparamModule, x: Tensor) -> Any:
    with r.unflattened_param(_theta(r)):
        return r.module(x)


def _replaced_buffers(r: ReparamModule, x: Tensor) -> Any:
    with r.replaced_buffers({"bn.running_mean": torch.zeros(4)}):
        return r(x)


def _pure(r: ReparamModule, x: Tensor) -> Any:
    return r.pure(x, flat_param=_theta(r))


def _population(strategy: str) -> Callable[[ReparamModule, Tensor], Any]:
    def call(r: ReparamModule, x: Tensor) -> Any:
        r.population_strategy = strategy  # type: ignore[assignment]
        try:
            return r(x, flat_param=_theta(r, 3))
        finally:
            r.population_strategy = "auto"

    return call


def _population_per_member(r: ReparamModule, x: Tensor) -> Any:
    buffers = [b.expand(3, *b.shape).clone() for b in r.module.buffers()]
    return r(x.expand(3, *x.shape), flat_param=_theta(r, 3), buffers=buffers, in_dims=0)


def _func_vmap(r: ReparamModule, x: Tensor) -> Any:
    return torch.func.vmap(lambda t: r(x, flat_param=t))(_theta(r, 3).detach())


def _func_grad(r: ReparamModule, x: Tensor) -> Any:
    return torch.func.grad(lambda t: r(x, flat_param=t).sum())(_theta(r).detach())


def _nested(r: ReparamModule, x: Tensor) -> Any:
    """The fault in an inner call: the enclosing block's vector is in effect again after it."""
    outer = _theta(r, seed=6)
    with torch.no_grad():
        expected = r(x, flat_param=outer)
    with r.unflattened_param(outer):
        try:
            r(x, flat_param=_theta(r))
        finally:
            with torch.no_grad():
                torch.testing.assert_close(r.module(x), expected, rtol=0, atol=0)


CALLS: dict[str, Callable[[ReparamModule, Tensor], Any]] = {
    "own": _own,
    "theta": _theta_call,
    "theta_and_buffers": _theta_buffers,
    "unwrapped_module": _module,
    "unflattened_param": _unflattened,
    "replaced_buffers": _replaced_buffers,
    "pure": _pure,
    "population_loop": _population("loop"),
    "population_vmap": _population("vmap"),
    "population_auto": _population("auto"),
    "population_per_member": _population_per_member,
    "func_vmap": _func_vmap,
    "func_grad": _func_grad,
    "nested": _nested,
}


@pytest.mark.parametrize("point", POINTS, ids=POINT_IDS)
@pytest.mark.parametrize("call", list(CALLS))
def test_fault_inside_forward(call: str, point: tuple[str, str]) -> None:
    r, x = zoo.composite()
    with guarded(r, x), fault_at(r, point, Injected(point)), pytest.raises(Injected):
        CALLS[call](r, x)


_UNWRAPPED_TRAIN_MODE = (
    "as a plain module (documented): a direct call of the unwrapped module runs outside the "
    "wrapper, so nothing snapshots its buffers; BatchNorm's update before the fault stays"
)
TRAIN_CALLS = ["own", "theta", "theta_and_buffers", "unwrapped_module", "pure", "population_loop"]


def _train_cases() -> Iterator[Any]:
    for call in TRAIN_CALLS:
        for point, point_id in zip(POINTS, POINT_IDS, strict=True):
            marks = (
                [pytest.mark.xfail(strict=True, reason=_UNWRAPPED_TRAIN_MODE)]
                if call == "unwrapped_module" and point in AFTER_BATCHNORM
                else []
            )
            yield pytest.param(call, point, marks=marks, id=f"{call}-{point_id}")


@pytest.mark.parametrize(("call", "point"), list(_train_cases()))
def test_fault_inside_forward_in_train_mode(call: str, point: tuple[str, str]) -> None:
    r, x = zoo.composite(train=True)
    with guarded(r, x), fault_at(r, point, Injected(point)), pytest.raises(Injected):
        CALLS[call](r, x)


@pytest.mark.parametrize("point", POINTS[::3], ids=POINT_IDS[::3])
@pytest.mark.parametrize(
    "call", ["own", "theta", "population_loop", "population_vmap", "population_auto", "func_vmap"]
)
def test_fault_that_is_not_an_exception(call: str, point: tuple[str, str]) -> None:
    """A ``BaseException`` (as ``KeyboardInterrupt``) unwinds as cleanly."""
    r, x = zoo.composite()
    with guarded(r, x), fault_at(r, point, InjectedBase(point)), pytest.raises(InjectedBase):
        CALLS[call](r, x)


# ---- input validation --------------------------------------------------------------------
N = zoo.composite()[0].param_numel
BUFFERS = "bn.running_mean, bn.running_var, bn.num_batches_tracked"
BAD_INPUTS: list[tuple[str, Callable[[ReparamModule, Tensor], Any], type[Exception], str]] = [
    ("flat_param_list", lambda r, x: r(x, flat_param=[0.0] * N), TypeError, f"flat_param must be a torch.Tensor of shape ({N},)"),
    ("flat_param_short", lambda r, x: r(x, flat_param=torch.zeros(N - 1)), ValueError, f"flat_param has shape ({N - 1},)"),
    ("flat_param_rank3", lambda r, x: r(x, flat_param=torch.zeros(1, 1, N)), ValueError, f"flat_param has shape (1, 1, {N})"),
    ("flat_param_scalar", lambda r, x: r(x, flat_param=torch.tensor(0.0)), ValueError, "flat_param has shape ()"),
    ("flat_param_float64", lambda r, x: r(x, flat_param=torch.zeros(N, dtype=torch.float64)), TypeError, "flat_param has dtype torch.float64"),
    ("flat_param_int", lambda r, x: r(x, flat_param=torch.zeros(N, dtype=torch.int64)), TypeError, "flat_param has dtype torch.int64"),
    ("flat_param_meta", lambda r, x: r(x, flat_param=torch.zeros(N, device="meta")), ValueError, "flat_param is on meta"),
    ("population_empty", lambda r, x: r(x, flat_param=torch.zeros(0, N)), ValueError, f"flat_param has shape (0, {N})"),
    ("population_short", lambda r, x: r(x, flat_param=torch.zeros(3, N + 1)), ValueError, f"flat_param has shape (3, {N + 1})"),
    ("population_float64", lambda r, x: r(x, flat_param=torch.zeros(3, N, dtype=torch.float64)), TypeError, "flat_param has dtype torch.float64"),
    ("buffers_count", lambda r, x: r(x, buffers=(torch.zeros(4),)), ValueError, f"buffers has 1 entries but this module has 3 buffers ({BUFFERS})"),
    ("buffers_shape", lambda r, x: r(x, buffers={"bn.running_mean": torch.zeros(5)}), ValueError, "bn.running_mean: expected shape (4,)"),
    ("buffers_dtype", lambda r, x: r(x, buffers={"bn.running_var": torch.ones(4, dtype=torch.float64)}), ValueError, "bn.running_var: expected shape (4,), dtype torch.float32"),
    ("buffers_not_tensor", lambda r, x: r(x, buffers=(torch.zeros(4), 1.0, torch.tensor(0))), TypeError, "buffers has entries that are not tensors"),
    ("buffers_unknown_name", lambda r, x: r(x, buffers={"bn.mean": torch.zeros(4)}), ValueError, "buffers has unknown names ['bn.mean']"),
    ("buffers_wrong_type", lambda r, x: r(x, buffers=3), TypeError, "buffers must be a tuple/list in module.buffers() order or a dict by name"),
    ("buffers_string", lambda r, x: r(x, buffers="bn"), TypeError, "buffers must be a tuple/list"),
    ("population_buffers_shape", lambda r, x: r(x, flat_param=torch.zeros(3, N), buffers={"bn.running_mean": torch.zeros(2, 4)}), ValueError, "expected shape (4,) or (3, 4)"),
    ("in_dims_single", lambda r, x: r(x, flat_param=torch.zeros(N), in_dims=0), ValueError, "in_dims applies to population calls only"),
    ("in_dims_length", lambda r, x: r(x, flat_param=torch.zeros(3, N), in_dims=(0, 0)), ValueError, "in_dims must be None, 0, or a tuple of 0/None"),
    ("in_dims_value", lambda r, x: r(x.expand(3, *x.shape), flat_param=torch.zeros(3, N), in_dims=(1,)), ValueError, "in_dims[0] must be 0 or None, got 1"),
    ("in_dims_size", lambda r, x: r(x, flat_param=torch.zeros(3, N), in_dims=0), ValueError, "in_dims[0] is 0 but input 0 is a tensor of shape (2, 3, 5, 5)"),
    ("strategy", lambda r, x: _with_strategy(r, "fastest", lambda: r(x, flat_param=torch.zeros(3, N))), ValueError, "strategy must be one of"),
    ("vmap_in_train_mode", lambda r, x: _with_strategy(r.train(), "vmap", lambda: r(x, flat_param=torch.zeros(3, N))), ValueError, "strategy 'vmap' would update buffers shared by all members"),
    ("unflattened_param", lambda r, x: r.unflattened_param(torch.zeros(3)).__enter__(), ValueError, "flat_param has shape (3,)"),
    ("replaced_buffers", lambda r, x: r.replaced_buffers((torch.zeros(4),)).__enter__(), ValueError, "buffers has 1 entries"),
    ("pure_flat_param", lambda r, x: r.pure(x, flat_param=torch.zeros(N + 2)), ValueError, f"flat_param has shape ({N + 2},)"),
    ("pure_buffers", lambda r, x: r.pure(x, buffers={"bn.running_var": torch.zeros(3)}), ValueError, "bn.running_var: expected shape (4,)"),
    ("pure_in_dims", lambda r, x: r.pure(x, in_dims=0), ValueError, "in_dims applies to population calls only"),
    ("assign_parameter", lambda r, x: setattr(r.module.conv, "weight", nn.Parameter(torch.zeros(4, 3, 3, 3))), AttributeError, "cannot assign to 'weight' of Conv2d"),
]  # fmt: skip


def _with_strategy(r: ReparamModule, strategy: str, call: Callable[[], Any]) -> Any:
    r.population_strategy = strategy  # type: ignore[assignment]
    try:
        return call()
    finally:
        r.population_strategy = "auto"
        r.eval()


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input(
    call: Callable[[ReparamModule, Tensor], Any], error: type[Exception], message: str
) -> None:
    r, x = zoo.composite()
    with guarded(r, x), pytest.raises(error, match=re.escape(message)):
        call(r, x)


# ---- inside backward ---------------------------------------------------------------------
def _raise_in_backward(point: tuple[str, str]) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        tensor = out[0] if isinstance(out, tuple) else out

        def boom(grad: Tensor) -> Tensor:
            raise Injected(point)

        tensor.register_hook(boom)
        return out

    return hook


BACKWARD_POINTS = [
    p for p in POINTS if p[0] == "after" and p[1] not in ("head.parametrizations.weight.0",)
]


def _backward_cases() -> Iterator[Any]:
    for call in ("own", "theta", "population_loop"):
        for point in BACKWARD_POINTS:
            yield pytest.param(call, point, id=f"{call}-after-{point[1] or 'root'}")
    # inside vmap, tensors are batched wrappers that take no hooks: the fault goes on the output
    yield pytest.param("population_vmap", None, id="population_vmap-output")


@pytest.mark.parametrize(("call", "point"), list(_backward_cases()))
def test_fault_inside_backward(call: str, point: tuple[str, str] | None) -> None:
    """No gradient lands anywhere (flat_param.grad, theta.grad) when backward raises."""
    r, x = zoo.composite()
    theta = _theta(r, 3) if call.startswith("population") else _theta(r)
    if call.startswith("population"):
        r.population_strategy = call.removeprefix("population_")  # type: ignore[assignment]
    with guarded(r, x):
        if point is None:
            out = r(x, flat_param=theta)
            _raise_in_backward(("after", "output"))(r.module, (), out)
        else:
            handle = r.module.get_submodule(point[1]).register_forward_hook(
                _raise_in_backward(point)
            )
            try:
                out = r(x) if call == "own" else r(x, flat_param=theta)
            finally:
                handle.remove()
        with pytest.raises(Injected):
            out.square().sum().backward()
        assert r.flat_param.grad is None
        assert theta.grad is None
        r.population_strategy = "auto"


# ---- inside vmap and torch.func ----------------------------------------------------------
def _vmapped_raises_after_the_call(r: ReparamModule, x: Tensor) -> Any:
    def member(t: Tensor) -> Tensor:
        r(x, flat_param=t)
        raise Injected("after the call, inside vmap")

    return torch.func.vmap(member)(_theta(r, 3).detach())


def _vmapped_raises_between_calls(r: ReparamModule, x: Tensor) -> Any:
    def member(t: Tensor) -> Tensor:
        with r.unflattened_param(t):
            r.module(x)
            raise Injected("inside a block, inside vmap")

    return torch.func.vmap(member)(_theta(r, 3).detach())


def _grad_raises_after_the_call(r: ReparamModule, x: Tensor) -> Any:
    def loss(t: Tensor) -> Tensor:
        r(x, flat_param=t).sum()
        raise Injected("inside torch.func.grad")

    return torch.func.grad(loss)(_theta(r).detach())


def _jacrev_of_vmap_raises(r: ReparamModule, x: Tensor) -> Any:
    def member(t: Tensor) -> Tensor:
        r(x, flat_param=t)
        raise Injected("inside jacrev(vmap)")

    return torch.func.jacrev(torch.func.vmap(member))(_theta(r, 2).detach())


def _population_member_raises(member: int, strategy: str) -> Callable[[ReparamModule, Tensor], Any]:
    """The fault at one member only (the loop: earlier members have run)."""

    def call(r: ReparamModule, x: Tensor) -> Any:
        seen = [0]

        def hook(*_: Any) -> None:
            if torch._C._are_functorch_transforms_active():
                return  # "auto"'s vmap trial: the fault is at one member of the loop
            seen[0] += 1
            if seen[0] == member + 1:
                raise Injected(f"member {member}")

        handle = r.module.head.register_forward_hook(hook)
        try:
            return _population(strategy)(r, x)
        finally:
            handle.remove()

    return call


VMAP_FAULTS: dict[str, Callable[[ReparamModule, Tensor], Any]] = {
    "vmapped_function_raises_after_the_call": _vmapped_raises_after_the_call,
    "vmapped_function_raises_inside_a_block": _vmapped_raises_between_calls,
    "func_grad_raises_after_the_call": _grad_raises_after_the_call,
    "jacrev_of_vmap_raises": _jacrev_of_vmap_raises,
    **{f"population_loop_member_{k}": _population_member_raises(k, "loop") for k in range(3)},
    "population_auto_member_1": _population_member_raises(1, "auto"),
}


@pytest.mark.parametrize("fault", list(VMAP_FAULTS))
def test_fault_inside_vmap_and_populations(fault: str) -> None:
    r, x = zoo.composite()
    with guarded(r, x), pytest.raises(Injected):
        VMAP_FAULTS[fault](r, x)


def test_fault_at_a_later_member_in_train_mode() -> None:
    """Train mode, the module's own buffers: member 0 updated them before member 1 raised."""
    r, x = zoo.composite(train=True)
    with guarded(r, x), pytest.raises(Injected):
        _population_member_raises(1, "loop")(r, x)


def test_fault_at_a_later_member_with_per_member_buffers() -> None:
    """Train mode with the caller's per-member buffers: the module's own stay untouched."""
    r, x = zoo.composite(train=True)
    buffers = [b.expand(3, *b.shape).clone() for b in r.module.buffers()]
    seen = [0]

    def hook(*_: Any) -> None:
        seen[0] += 1
        if seen[0] == 2:
            raise Injected("member 1")

    r.population_strategy = "loop"

    with guarded(r, x):
        handle = r.module.head.register_forward_hook(hook)
        try:
            with pytest.raises(Injected):
                r(x, flat_param=_theta(r, 3), buffers=buffers)
        finally:
            handle.remove()


# ---- while loading a state dict ----------------------------------------------------------
def _other_state(fmt: str) -> dict[str, Any]:
    """A valid state dict of another composite model (all values differ), in either format."""
    other, _ = zoo.composite()
    with torch.no_grad():
        other.flat_param.add_(1.0)
        for b in other.module.buffers():
            b.add_(1)
    return dict(other.state_dict()) if fmt == "wrapper" else dict(other.module.state_dict())


def _edit(fmt: str, edit: Callable[[dict[str, Any], str], None]) -> dict[str, Any]:
    state = _other_state(fmt)
    edit(state, "module." if fmt == "wrapper" else "")
    return state


def _last_buffer(state: dict[str, Any], prefix: str) -> str:
    return prefix + "bn.running_var"


STATE_FAULTS: list[tuple[str, Callable[[dict[str, Any], str], None], type[BaseException], str | None]] = [
    ("wrong_shape", lambda s, p: s.__setitem__(p + "bn.running_mean", torch.zeros(5)), StateDictMismatchError, "bn.running_mean: shape (5,)"),
    ("missing_key", lambda s, p: s.pop(p + "bn.running_var"), StateDictMismatchError, "Missing key(s): 'bn.running_var'"),
    ("unexpected_key", lambda s, p: s.__setitem__(p + "extra", torch.zeros(1)), StateDictMismatchError, "Unexpected key(s):"),
    ("not_a_tensor", lambda s, p: s.__setitem__(_last_buffer(s, p), "abc"), Exception, None),
    ("meta_tensor", lambda s, p: s.__setitem__(_last_buffer(s, p), torch.zeros(4, device="meta")), Exception, None),
]  # fmt: skip
_MODULE_ONLY = [
    ("parameter_wrong_shape", lambda s, p: s.__setitem__("head.parametrizations.weight.original1", torch.zeros(3, 7)), StateDictMismatchError, "head.parametrizations.weight.original1: shape (3, 7)"),
]  # fmt: skip
_WRAPPER_ONLY = [
    ("flat_param_wrong_shape", lambda s, p: s.__setitem__("flat_param", torch.zeros(3)), StateDictMismatchError, "flat_param: shape (3,)"),
]  # fmt: skip


def _state_cases() -> Iterator[Any]:
    for fmt, extra in (("module", _MODULE_ONLY), ("wrapper", _WRAPPER_ONLY)):
        for name, edit, error, message in [*STATE_FAULTS, *extra]:
            yield pytest.param(fmt, edit, error, message, id=f"{fmt}-{name}")
        yield pytest.param(fmt, None, Injected, None, id=f"{fmt}-load_hook_raises")


@pytest.mark.parametrize(("fmt", "edit", "error", "message"), list(_state_cases()))
def test_fault_while_loading_a_state_dict(
    fmt: str, edit: Any, error: type[BaseException], message: str | None
) -> None:
    r, x = zoo.composite()
    state = _edit(fmt, edit) if edit is not None else _other_state(fmt)
    handle = None
    if edit is None:  # a user's load hook on a late submodule raises, mid-load

        def hook(*_: Any) -> None:
            raise Injected("load hook")

        handle = r.module.head._register_load_state_dict_pre_hook(hook)
    try:
        with (
            guarded(r, x),
            pytest.raises(error, match=None if message is None else re.escape(message)),
        ):
            r.load_state_dict(state)
    finally:
        if handle is not None:
            handle.remove()


def test_load_state_dict_with_strict_false_still_checks_shapes() -> None:
    r, x = zoo.composite()
    state = _other_state("module")
    state["bn.running_mean"] = torch.zeros(5)
    with (
        guarded(r, x),
        pytest.raises(StateDictMismatchError, match=re.escape("bn.running_mean: shape (5,)")),
    ):
        r.load_state_dict(state, strict=False)


# ---- while tracing -----------------------------------------------------------------------
def test_fault_while_tracing() -> None:
    r, x = zoo.composite()
    with guarded(r, x), pytest.raises(RuntimeError):
        r.trace(torch.randn(2, 5, 5, 5))  # three channels expected: the convolution raises
    assert r._traced is None


# ---- faults in several threads at once ----------------------------------------------------
THREAD_FAULTS = {"injected": 0}


def test_faults_in_threads_do_not_disturb_the_others() -> None:
    """Four threads alternate raising calls (a fault in that thread only) and normal calls with
    their own vectors; every normal call gets its serial result; the module is unchanged."""
    r, x = zoo.composite()
    thetas = [_theta(r, seed=20 + i).detach() for i in range(4)]
    with torch.no_grad():
        serial = [r(x, flat_param=t) for t in thetas]
    local = threading.local()
    faults = [0] * 4
    mismatches: list[Any] = []

    def maybe_raise(*_: Any) -> None:
        if getattr(local, "armed", False):
            raise Injected("in one thread")

    def worker(i: int) -> None:
        for k in range(40):
            local.armed = k % 2 == 0
            try:
                with torch.no_grad():
                    out = (
                        r(x, flat_param=thetas[i]) if k % 4 else r(x, flat_param=thetas[i][None])[0]
                    )
            except Injected:
                faults[i] += 1
                continue
            if not torch.equal(out, serial[i]):
                mismatches.append((i, k))

    with guarded(r, x):
        handle = r.module.attn.register_forward_pre_hook(maybe_raise)
        pool = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        handle.remove()
    assert mismatches == []
    assert sum(faults) == 4 * 20
    THREAD_FAULTS["injected"] += sum(faults)


def test_a_wrap_that_fails_leaves_the_model_as_it_was() -> None:
    class Picky(nn.Linear):
        def __init_subclass__(cls, **kwargs: object) -> None:
            raise TypeError("no subclasses")

    net = nn.Sequential(nn.Linear(2, 2), Picky(2, 2))
    classes = [type(m) for m in net.modules()]
    params = dict(net.named_parameters())
    with pytest.raises(TypeError, match="no subclasses"):
        ReparamModule(net)
    assert [type(m) for m in net.modules()] == classes
    assert dict(net.named_parameters()) == params
    net(torch.randn(1, 2)).sum().backward()  # an ordinary model again
