"""The parity table: what a user can do with a wrapped model, row by row, against a plain twin.

The promise: every operation applied to the wrapper or to the unwrapped module (``r.module``)
either gives the same result as on an *unwrapped twin* (the plain module, deep-copied before
wrapping; ``torch.func.functional_call(twin, ...)`` for a call with another vector), or is
refused with a clear error (``ValueError``/``TypeError``/``RuntimeError`` whose message names
the operation and says what to do) before anything changes. Never a silent no-op, never a
result computed with other weights.

Each :class:`Row` is one operation with its expected answer: ``"same"`` (``check`` applies it
to the wrapped model and to the twin and compares outputs, gradients, parameter values, state
dicts and return values bit for bit, or within 1e-6 where inductor or batched kernels round
differently) or ``"refused: <what to do>"`` (``check`` asserts the refusal and an unchanged
model, and returns the message). This file holds the framework, the models and the rows of
``torch.nn.utils`` and of the ``nn.Module`` API; ``tests/test_parity.py`` adds optimizers,
calls, threads, populations and Hugging Face, lists the known gaps (``GAPS``: marked
``xfail(strict=True)``) and runs the table. ``scripts/parity_page.py`` writes the docs page.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from conftest import Tied
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize, prune

from torchreparam import ReparamModule

REFUSALS = (ValueError, TypeError, RuntimeError)


@dataclass(frozen=True)
class Row:
    """One operation. ``check()`` raises when the library breaks the expected ``answer``."""

    group: str
    name: str
    label: str
    check: Callable[[], str | None]
    answer: str = "same"
    xfail: str | None = None

    def __repr__(self) -> str:
        return f"Row({self.name})"


# ---- models (built under a fixed seed; the twin is a deepcopy taken before wrapping) ----------
class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, num_layers=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(x)[0])


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def convbn() -> nn.Module:
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    return nn.Sequential(*conv, nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32)
    return GPT2LMHeadModel(config).eval()


def _randn(*shape: int) -> Callable[[], tuple[Tensor, ...]]:
    return lambda: (torch.randn(*shape),)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Any, ...]]]] = {
    "mlp": (mlp, _randn(4, 5)),
    "convbn": (convbn, _randn(2, 3, 5, 5)),
    "tied": (Tied, lambda: (torch.randint(0, 10, (4, 3)),)),
    "lstm": (LSTMNet, _randn(5, 2, 3)),
    "gpt2": (gpt2, lambda: (torch.randint(0, 50, (2, 7)),)),
}


def pair(model: str | Callable[[], nn.Module]) -> tuple[ReparamModule, nn.Module, tuple[Any, ...]]:
    """(wrapper, unwrapped twin, example inputs): equal modules, the twin copied before wrapping."""
    factory, inputs = MODELS[model] if isinstance(model, str) else (model, _randn(4, 5))
    torch.manual_seed(0)
    net = factory()
    twin = copy.deepcopy(net)
    torch.manual_seed(1)
    return ReparamModule(net), twin, inputs()


def near(r: ReparamModule, seed: int = 2, *batch: int) -> Tensor:
    """A vector near the module's own (or ``batch`` of them), requiring grad."""
    g = torch.Generator().manual_seed(seed)
    flat = r.flat_param.detach()
    return (flat + 0.1 * torch.randn(*batch, flat.numel(), generator=g)).requires_grad_()


def reference(twin: nn.Module, r: ReparamModule, theta: Tensor, args: tuple[Any, ...]) -> Any:
    return torch.func.functional_call(twin, r.layout.unflatten(theta), args)


def _out(out: Any) -> Any:
    return getattr(out, "logits", out)  # a Hugging Face model's output: its logits


def loss(out: Any) -> Tensor:
    out = _out(out)
    return (out[0] if isinstance(out, tuple) else out).square().mean()


def flat_of(twin: nn.Module, r: ReparamModule) -> Tensor:
    """The twin's parameter values in the layout's order: what ``r.flat_param`` should hold."""
    return torch.cat([twin.get_parameter(e.name).detach().reshape(-1) for e in r.layout])


def grads_of(twin: nn.Module, r: ReparamModule) -> Tensor | None:
    grads = [twin.get_parameter(e.name).grad for e in r.layout]
    if all(g is None for g in grads):
        return None
    return torch.cat([torch.zeros(e.numel) if g is None else g.reshape(-1) for e, g in zip(r.layout, grads, strict=True)])  # fmt: skip


def user_grads(module: nn.Module) -> list[Tensor | None]:
    """``p.grad`` for ``p in module.parameters()``, as user code reads them (torch warns when
    they are not leaves: the value is what is compared)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [p.grad for p in module.parameters()]


def named(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in module.named_parameters()}


# ---- comparisons ------------------------------------------------------------------------
def _show(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor {tuple(value.shape)} {value.dtype}"
    return f"{type(value).__name__} {value!r}"[:120]


def _diff(got: Any, want: Any, tol: float | None) -> str | None:
    if isinstance(got, Tensor) or isinstance(want, Tensor):
        if not (isinstance(got, Tensor) and isinstance(want, Tensor)):
            return f"got {_show(got)}, expected {_show(want)}"
        if got.dtype != want.dtype or got.shape != want.shape:
            return f"got {_show(got)}, expected {_show(want)}"
        g, w = got.detach(), want.detach()
        ok = torch.equal(g, w) if tol is None else torch.allclose(g, w, rtol=tol, atol=tol)
        if ok:
            return None
        return f"values differ (max abs diff {(g - w).abs().max().item():.3g})"
    if isinstance(want, Mapping):
        if not isinstance(got, Mapping) or list(got) != list(want):
            return f"keys: got {list(got) if isinstance(got, Mapping) else _show(got)}, expected {list(want)}"
        for key in want:
            if (problem := _diff(got[key], want[key], tol)) is not None:
                return f"[{key!r}]: {problem}"
        return None
    if isinstance(want, (list, tuple)) and not hasattr(want, "_fields"):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            return f"got {_show(got)}, expected {len(want)} items"
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            if (problem := _diff(a, b, tol)) is not None:
                return f"[{i}]: {problem}"
        return None
    return None if got == want else f"got {_show(got)}, expected {_show(want)}"


def same(got: Any, want: Any, what: str = "result") -> None:
    """Bit for bit: tensors of equal dtype, shape and values; containers item by item."""
    if (problem := _diff(got, want, None)) is not None:
        raise AssertionError(f"{what}: {problem}")


def close(got: Any, want: Any, what: str = "result", tol: float = 1e-6) -> None:
    """Within ``tol`` (relative and absolute): for compiled and vectorized code only."""
    if (problem := _diff(got, want, tol)) is not None:
        raise AssertionError(f"{what}: {problem}")


def same_state(net: nn.Module, twin: nn.Module, what: str = "state_dict") -> None:
    same(dict(net.state_dict()), dict(twin.state_dict()), what)


def structure(module: nn.Module) -> list[Any]:
    """What a refusal must not change besides the state: submodules, parameters, hooks (and a
    Hugging Face model's config)."""
    config = module.config.to_dict() if hasattr(module, "config") else None
    return [config] + [(n, type(m), len(m._forward_pre_hooks), len(m._forward_hooks), sorted(m._parameters)) for n, m in module.named_modules()]  # fmt: skip


@contextmanager
def unchanged(r: ReparamModule, args: tuple[Any, ...]) -> Iterator[None]:
    """The block leaves ``r`` as it was: the same ``flat_param`` object and ``requires_grad``,
    bit-identical state dicts, the same structure, and outputs equal to a copy taken before."""
    before, flat = copy.deepcopy(r), r.flat_param
    states, shape = [dict(m.state_dict()) for m in (r, r.module)], (structure(r.module), flat.requires_grad)  # fmt: skip
    yield
    assert r.flat_param is flat, "flat_param was replaced"
    assert (structure(r.module), flat.requires_grad) == shape, "the structure or requires_grad changed"  # fmt: skip
    try:
        same([dict(m.state_dict()) for m in (r, r.module)], states, "state dicts (wrapper, module)")
        with torch.no_grad():
            same(_out(r(*args)), _out(before(*args)), "r(x) afterwards")
            same(_out(r.module(*args)), _out(before.module(*args)), "net(x) afterwards")
    except AssertionError:
        raise
    except Exception as error:
        raise AssertionError(f"the model is broken afterwards: {type(error).__name__}: {error}") from error  # fmt: skip


# ---- row builders -----------------------------------------------------------------------
def same_row(group: str, name: str, label: str, check: Callable[[], None]) -> Row:
    return Row(group, name, label, check)


def refused_row(
    group: str, name: str, label: str, advice: str, model: str | Callable[[], nn.Module],
    op: Callable[[ReparamModule], Any], names: str, says: str,
) -> Row:  # fmt: skip
    """Applying ``op`` to a wrapper of ``model`` raises ``REFUSALS``, with a message matching
    ``names`` (the operation) and ``says`` (what to do), and changes nothing."""

    def check() -> str:
        r, _, args = pair(model)
        with unchanged(r, args):
            try:
                op(r)
            except REFUSALS as error:
                message = str(error)
            else:
                raise AssertionError("not refused: the operation ran without an error")
        for what, pattern in (("name the operation", names), ("say what to do", says)):
            assert re.search(pattern, message, re.I), f"message does not {what} ({pattern!r}): {message}"  # fmt: skip
        return message

    return Row(group, name, label, check, f"refused: {advice}")


# ---- torch.nn.utils ---------------------------------------------------------------------
U = "torch.nn.utils"
nnu = torch.nn.utils


def _backward(model: str = "mlp") -> tuple[ReparamModule, nn.Module, tuple[Any, ...]]:
    r, twin, x = pair(model)
    loss(r.module(*x)).backward()
    loss(twin(*x)).backward()
    return r, twin, x


def _clip(clip: Callable[[Any], Any]) -> Callable[[], None]:
    def check() -> None:
        r, twin, _ = _backward()
        same(clip(r.module.parameters()), clip(twin.parameters()), "return value")
        same(user_grads(r.module), user_grads(twin), "p.grad for p in net.parameters()")
        same(r.flat_param.grad, grads_of(twin, r), "flat_param.grad (what an optimizer of it uses)")

    return check


def _total_norm() -> None:
    r, twin, _ = _backward()
    grads = user_grads(r.module)
    same(nnu.get_total_norm(grads), nnu.get_total_norm(user_grads(twin)), "total norm")


def _vector_to_parameters() -> None:
    r, twin, x = pair("mlp")
    opt, opt_twin = torch.optim.SGD([r.flat_param], lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)  # fmt: skip
    v = torch.randn(r.param_numel)
    nnu.vector_to_parameters(v, r.module.parameters())
    nnu.vector_to_parameters(v.clone(), twin.parameters())
    same(r.module(*x), twin(*x), "net(x) after")
    same(r.flat_param.detach(), v, "flat_param after (it should hold v)")
    same_state(r.module, twin)
    loss(r(*x)).backward()
    loss(twin(*x)).backward()
    opt.step()
    opt_twin.step()
    same(r.flat_param.detach(), flat_of(twin, r), "flat_param after an optimizer step")
    same(r.module(*x), twin(*x), "net(x) after an optimizer step")


def _parameters_to_vector(model: str) -> Callable[[], None]:
    def check() -> None:
        r, twin, _ = pair(model)
        v = nnu.parameters_to_vector(r.module.parameters())
        same(v, nnu.parameters_to_vector(twin.parameters()))
        same(v, r.flat_param, "the vector against flat_param (the layout contract)")

    return check


def _fuse_conv_bn() -> None:
    r, twin, x = pair("convbn")
    r.module(*x), twin(*x)  # running statistics away from their initial values
    r.eval(), twin.eval()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(r.module[0], r.module[1])
    fused_twin = torch.nn.utils.fusion.fuse_conv_bn_eval(twin[0], twin[1])
    same(fused(*x), fused_twin(*x), "the fused conv's output")
    same(named(fused), named(fused_twin), "the fused conv's parameters")
    with torch.no_grad():
        fused.weight.zero_()
    same(r.module(*x), twin(*x), "the wrapped model after writing into the fused copy")


def _weight_normed() -> nn.Module:
    return nn.Sequential(parametrizations.weight_norm(nn.Linear(5, 7)), nn.Tanh(), nn.Linear(7, 3))


def _assign_parametrized() -> None:
    r, twin, x = pair(_weight_normed)
    w = torch.randn(7, 5)
    r.module[0].weight = w
    twin[0].weight = w.clone()
    same(r.module(*x), twin(*x), "net(x) after the assignment")
    same_state(r.module, twin)
    same(r.flat_param.detach(), flat_of(twin, r), "flat_param after the assignment")


def _skip_init(to_empty: bool) -> Callable[[], None]:
    def factory() -> nn.Module:
        layers = (nnu.skip_init(nn.Linear, 5, 7), nn.Tanh(), nnu.skip_init(nn.Linear, 7, 3))
        return nn.Sequential(*layers) if not to_empty else mlp()

    def check() -> None:
        r, twin, x = pair(factory)
        for module in (r.module, twin):
            if to_empty:
                module.to_empty(device="cpu")
            torch.manual_seed(3)
            for layer in (module[0], module[2]):
                layer.reset_parameters()
        same(r.module(*x), twin(*x), "net(x) after reset_parameters()")
        same(r.flat_param.detach(), flat_of(twin, r), "flat_param after reset_parameters()")

    return check


def _functional_call(fn: Callable[..., Any], subset: bool) -> Callable[[], None]:
    def check() -> None:
        r, twin, x = pair("mlp")
        theta = near(r)
        ref = theta.detach().clone().requires_grad_()
        params, params_ref = r.layout.unflatten(theta), r.layout.unflatten(ref)
        if subset:
            params, params_ref = {"2.weight": params["2.weight"]}, {"2.weight": params_ref["2.weight"]}  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # stateless.functional_call: deprecated
            out, want = fn(r.module, params, x), fn(twin, params_ref, x)
        same(out, want, "output")
        loss(out).backward()
        loss(want).backward()
        same(theta.grad, ref.grad, "gradient w.r.t. the given tensors")
        same(r.flat_param.grad, grads_of(twin, r), "gradient of the module's own parameters")
        same(r.module(*x), twin(*x), "net(x) afterwards (its own weights)")

    return check


BEFORE = r"before wrapp|then wrap|wrap .*after"
_PARAMETRIZE = r"weight_norm|orthogonal|spectral_norm|parametri"
ROWS_UTILS = [
    same_row(U, "clip_grad_norm", "`clip_grad_norm_(net.parameters(), max_norm)` after `net(x)...backward()`", _clip(lambda ps: nnu.clip_grad_norm_(ps, 0.05))),
    same_row(U, "clip_grad_value", "`clip_grad_value_(net.parameters(), clip_value)`", _clip(lambda ps: nnu.clip_grad_value_(ps, 0.01))),
    same_row(U, "get_total_norm", "`get_total_norm([p.grad for p in net.parameters()])`", _total_norm),
    same_row(U, "parameters_to_vector", "`parameters_to_vector(net.parameters())`", _parameters_to_vector("mlp")),
    same_row(U, "parameters_to_vector_tied", "`parameters_to_vector(net.parameters())`, tied weights", _parameters_to_vector("tied")),
    same_row(U, "vector_to_parameters", "`vector_to_parameters(v, net.parameters())`, then an optimizer step on `r.flat_param`", _vector_to_parameters),
    same_row(U, "fuse_conv_bn_eval", "`fusion.fuse_conv_bn_eval(net[0], net[1])` (eval mode)", _fuse_conv_bn),
    refused_row(U, "prune_after", "`prune.l1_unstructured(net[0], 'weight', amount=0.3)` after wrapping", "prune, then `prune.remove`, before wrapping", "mlp",
                lambda r: prune.l1_unstructured(r.module[0], "weight", amount=0.3), r"prun|weight_orig", BEFORE),
    refused_row(U, "weight_norm_after", "`parametrizations.weight_norm(net[0])` after wrapping", "register parametrizations before wrapping", "mlp",
                lambda r: parametrizations.weight_norm(r.module[0]), _PARAMETRIZE, BEFORE),
    refused_row(U, "orthogonal_after", "`parametrizations.orthogonal(net[0])` after wrapping", "register parametrizations before wrapping", "mlp",
                lambda r: parametrizations.orthogonal(r.module[0]), _PARAMETRIZE, BEFORE),
    refused_row(U, "spectral_norm_after", "`parametrizations.spectral_norm(net[0])` after wrapping", "register parametrizations before wrapping", "mlp",
                lambda r: parametrizations.spectral_norm(r.module[0]), _PARAMETRIZE, BEFORE),
    refused_row(U, "old_spectral_norm_after", "`nn.utils.spectral_norm(net[0])` (the old, hook-based one) after wrapping", "use `parametrizations.spectral_norm`, before wrapping", "mlp",
                lambda r: nnu.spectral_norm(r.module[0]), r"spectral_norm", r"parametrizations"),
    refused_row(U, "remove_parametrizations", "`parametrize.remove_parametrizations(net[0], 'weight')` of one registered before wrapping", "remove parametrizations before wrapping", _weight_normed,
                lambda r: parametrize.remove_parametrizations(r.module[0], "weight"), _PARAMETRIZE, BEFORE),
    same_row(U, "assign_parametrized", "`net[0].weight = w` through a `weight_norm` parametrization (registered before wrapping)", _assign_parametrized),
    same_row(U, "skip_init", "`skip_init(nn.Linear, ...)` layers, wrapped, then `reset_parameters()`", _skip_init(False)),
    same_row(U, "to_empty", "`net.to_empty(device='cpu')`, then `reset_parameters()`", _skip_init(True)),
    same_row(U, "stateless_functional_call", "`stateless.functional_call(net, params, x)` (values, gradients)", _functional_call(nnu.stateless.functional_call, False)),
    same_row(U, "func_functional_call_subset", "`torch.func.functional_call(net, {'2.weight': w}, x)` (some parameters)", _functional_call(torch.func.functional_call, True)),
]  # fmt: skip


# ---- the nn.Module API on the unwrapped module --------------------------------------------
M = "The `nn.Module` API on the unwrapped module `net = r.module`"


def _values(fn: Callable[[nn.Module], Any], model: str = "mlp") -> Callable[[], None]:
    def check() -> None:
        r, twin, _ = pair(model)
        same(fn(r.module), fn(twin))

    return check


def flags(module: nn.Module) -> list[Any]:
    return [(n, p.detach(), p.requires_grad) for n, p in module.named_parameters()]


def _get_submodule() -> None:
    r, twin, _ = pair("mlp")
    h = torch.randn(4, 7)
    same(r.module.get_submodule("2")(h), twin.get_submodule("2")(h))


def _load(strict: bool = True, assign: bool = False) -> Callable[[], None]:
    def check() -> None:
        r, twin, x = pair("mlp")
        torch.manual_seed(5)
        state = mlp().state_dict()
        if not strict:
            state = {"0.weight": state["0.weight"], "extra": torch.ones(2)}
        got, want = (m.load_state_dict(copy.deepcopy(state), strict=strict, assign=assign) for m in (r.module, twin))  # fmt: skip
        same(got, want, "return value")
        same(r.module(*x), twin(*x), "net(x) after loading")
        same_state(r.module, twin)
        same(r.flat_param.detach(), flat_of(twin, r), "flat_param after loading")
        same(r(*x, flat_param=near(r)), reference(twin, r, near(r), x), "a call with another vector")  # fmt: skip

    return check


def _to_double() -> None:
    r, twin, x = pair("mlp")
    r.module.to(torch.float64)
    twin.to(torch.float64)
    x = tuple(a.double() for a in x)
    same(r.module(*x), twin(*x), "net(x) in float64")
    same(r.flat_param.dtype, torch.float64, "flat_param's dtype")
    same_state(r.module, twin)


def _cpu() -> None:
    r, twin, x = pair("convbn")
    flat = r.flat_param
    r.module.cpu()
    twin.cpu()
    same(r.module(*x), twin(*x))
    assert r.flat_param is flat, "cpu() on a cpu module replaced flat_param"


def _share_memory() -> None:
    r, twin, x = pair("mlp")
    r.module.share_memory()
    twin.share_memory()
    same([p.is_shared() for p in r.module.parameters()], [p.is_shared() for p in twin.parameters()], "is_shared()")  # fmt: skip
    same(r.flat_param.is_shared(), True, "flat_param.is_shared()")
    with torch.no_grad():
        r.flat_param.mul_(2)
        for p in twin.parameters():
            p.mul_(2)
    same(r.module(*x), twin(*x), "net(x) after writing into flat_param")


def _apply_init() -> None:
    r, twin, x = pair("mlp")

    def init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight)
            nn.init.zeros_(m.bias)

    for module in (r.module, twin):
        torch.manual_seed(3)
        module.apply(init)
    same(r.module(*x), twin(*x), "net(x) after apply(init)")
    same(r.flat_param.detach(), flat_of(twin, r), "flat_param after apply(init)")


def _storage_bytes(module: nn.Module) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in module.state_dict().values()}  # fmt: skip
    storages |= {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}  # fmt: skip
    return sum(storages.values())


def _trains_alone(r: ReparamModule, twin: nn.Module, copies: tuple[nn.Module, nn.Module], x: tuple[Any, ...]) -> None:  # fmt: skip
    """A copy (and the twin's) trains on its own, as a plain module; the model is untouched."""
    for module in copies:
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        loss(module(*x)).backward()
        opt.step()
    same(named(copies[0]), named(copies[1]), "the copy's parameters after an SGD step")
    same(r.module(*x), twin(*x), "the wrapped model after training the copy")


def _deepcopy_submodule() -> None:
    r, twin, x = pair(lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1000)))
    c, c_twin = copy.deepcopy(r.module[0]), copy.deepcopy(twin[0])
    same(c(*x), c_twin(*x), "the copy's output")
    same(named(c), named(c_twin), "the copy's parameters")
    size, plain = _storage_bytes(c), _storage_bytes(c_twin)
    assert size <= plain, f"the copy holds {size} bytes of tensors, the plain copy {plain}"
    size, plain = len(pickle.dumps(c)), len(pickle.dumps(c_twin))
    assert size <= plain + 4096, f"the copy pickles to {size} bytes, the plain copy to {plain}"
    _trains_alone(r, twin, (c, c_twin), x)


def _deepcopy_root() -> None:
    r, twin, x = pair("convbn")
    c, c_twin = copy.deepcopy(r.module), copy.deepcopy(twin)
    same([type(m) for m in c.modules()], [type(m) for m in c_twin.modules()], "the copy's classes")
    same(c(*x), c_twin(*x), "the copy's output")
    same_state(c, c_twin, "the copy's state_dict")
    _trains_alone(r, twin, (c, c_twin), x)


def _pickle() -> None:
    r, twin, x = pair("convbn")
    p, p_twin = (pickle.loads(pickle.dumps(m)) for m in (r.module, twin))
    same(p(*x), p_twin(*x), "the unpickled module's output")
    same_state(p, p_twin)
    with torch.no_grad():
        for module in (p, p_twin):
            for param in module.parameters():
                param.zero_()
    same(p(*x), p_twin(*x), "the unpickled module after zeroing its parameters")
    same(r.module(*x), twin(*x), "the wrapped model after writing into the unpickled one")


def _edit(op: Callable[[nn.Module], None]) -> Callable[[], None]:
    def check() -> None:
        r, twin, x = pair("mlp")
        op(r.module)
        op(twin)
        same(r.module(*x), twin(*x), "net(x) after")
        same(r(*x), twin(*x), "r(x) after")
        theta = near(r)
        same(r(*x, flat_param=theta), reference(twin, r, theta, x), "r(x, flat_param=theta) after")

    return check


def _replace_activation(m: nn.Module) -> None:
    m[1] = nn.ReLU()


def _del_activation(m: nn.Module) -> None:
    del m[1]
    m.insert(1, nn.Sigmoid())


def _train_eval() -> None:
    r, twin, x = pair("convbn")
    for mode in (False, True, False):
        r.module.train(mode)
        twin.train(mode)
        same([m.training for m in r.module.modules()], [m.training for m in twin.modules()], f"training flags, train({mode})")  # fmt: skip
        same(r.module(*x), twin(*x), f"net(x) in train({mode})")
        same(r(*x), twin(*x), f"r(x) in train({mode})")
        same_state(r.module, twin, f"state_dict in train({mode})")


def _parent() -> None:
    r, twin, x = pair("mlp")
    outer, outer_twin = nn.Sequential(r.module, nn.ReLU()), nn.Sequential(twin, nn.ReLU())
    same(flags(outer), flags(outer_twin), "the new parent's named_parameters()")
    same_state(outer, outer_twin, "the new parent's state_dict")
    same(outer(*x), outer_twin(*x), "the new parent's output")


def _backward_hook() -> None:
    r, twin, x = pair("mlp")
    seen: list[list[Any]] = [[], []]
    for module, log in zip((r.module, twin), seen, strict=True):
        hook = lambda m, gi, go, log=log: log.append((gi, go))  # noqa: E731
        module[2].register_full_backward_hook(hook)
        module[0].register_forward_hook(lambda m, a, out, log=log: log.append(m.weight.sum()))
        loss(module(*x)).backward()
    same(seen[0], seen[1], "what the hooks saw")
    same(r.flat_param.grad, grads_of(twin, r), "flat_param.grad")


def _torch_save() -> None:
    r, twin, _ = pair("convbn")
    files = [io.BytesIO(), io.BytesIO()]
    for module, f in zip((r.module, twin), files, strict=True):
        torch.save(module.state_dict(), f)
        f.seek(0)
    loaded = [torch.load(f, weights_only=True) for f in files]
    same(dict(loaded[0]), dict(loaded[1]), "torch.load(..., weights_only=True) of the saved state_dict")  # fmt: skip


def _setitem(m: nn.Module) -> None:
    m[2] = nn.Linear(7, 3)


def _delitem(m: nn.Module) -> None:
    del m[2]


_SUBMODULE = r"submodule|'2'"
ROWS_MODULE = [
    same_row(M, "parameters", "`net.parameters()` (values, `requires_grad`)", _values(lambda m: [(p.detach(), p.requires_grad) for p in m.parameters()])),
    same_row(M, "parameters_tied", "`net.parameters()`, tied weights (each once)", _values(lambda m: [p.detach() for p in m.parameters()], "tied")),
    same_row(M, "named_parameters", "`net.named_parameters()`, LSTM", _values(flags, "lstm")),
    same_row(M, "named_parameters_duplicates", "`net.named_parameters(remove_duplicate=False)`, tied weights", _values(lambda m: [(n, p.detach()) for n, p in m.named_parameters(remove_duplicate=False)], "tied")),
    same_row(M, "get_parameter", "`net.get_parameter('out.weight')`, tied weights", _values(lambda m: m.get_parameter("out.weight").detach(), "tied")),
    same_row(M, "get_submodule", "`net.get_submodule('2')(h)`", _get_submodule),
    same_row(M, "state_dict", "`net.state_dict()`, conv + BatchNorm", _values(lambda m: dict(m.state_dict()), "convbn")),
    same_row(M, "load_state_dict", "`net.load_state_dict(sd)` (strict)", _load()),
    same_row(M, "load_state_dict_nonstrict", "`net.load_state_dict(partial, strict=False)` (return value: missing and unexpected keys)", _load(strict=False)),
    same_row(M, "load_state_dict_assign", "`net.load_state_dict(sd, assign=True)`", _load(assign=True)),
    same_row(M, "to_dtype", "`net.to(torch.float64)`", _to_double),
    refused_row(M, "half_submodule", "`net[2].half()` (one submodule)", "convert the whole model (`r.half()` or `net.half()`)", "mlp",
                lambda r: r.module[2].half(), r"dtype|half|float16", r"whole|r\.half|r\.to|\.to\(|all param"),
    same_row(M, "cpu", "`net.cpu()`", _cpu),
    same_row(M, "share_memory", "`net.share_memory()`", _share_memory),
    same_row(M, "apply_init", "`net.apply(init)` with an init writing weights in place", _apply_init),
    same_row(M, "deepcopy_submodule", "`copy.deepcopy(net[0])` (a plain, small, independent module)", _deepcopy_submodule),
    same_row(M, "deepcopy_module", "`copy.deepcopy(net)` (the whole unwrapped module: a plain, independent module)", _deepcopy_root),
    same_row(M, "pickle", "`pickle.loads(pickle.dumps(net))`, conv + BatchNorm", _pickle),
    refused_row(M, "register_parameter_new", "`net[0].register_parameter('extra', nn.Parameter(...))` (a new name)", "make structural changes before wrapping", "mlp",
                lambda r: r.module[0].register_parameter("extra", nn.Parameter(torch.ones(3))), r"register_parameter|extra", BEFORE),
    refused_row(M, "register_parameter_managed", "`net[0].register_parameter('weight', nn.Parameter(...))` (a managed name)", "write into `flat_param` (or `load_state_dict`)", "mlp",
                lambda r: r.module[0].register_parameter("weight", nn.Parameter(torch.zeros(7, 5))), r"weight", r"flat_param|load_state_dict"),
    refused_row(M, "replace_submodule", "`net[2] = nn.Linear(7, 3)` (a submodule holding managed parameters)", "change the model before wrapping", "mlp",
                lambda r: _setitem(r.module), _SUBMODULE, BEFORE),
    refused_row(M, "del_submodule", "`del net[2]` (a submodule holding managed parameters)", "change the model before wrapping", "mlp",
                lambda r: _delitem(r.module), _SUBMODULE, BEFORE),
    same_row(M, "replace_activation", "`net[1] = nn.ReLU()` (a submodule without parameters)", _edit(_replace_activation)),
    same_row(M, "del_activation", "`del net[1]` (a submodule without parameters), `net.insert(1, ...)`", _edit(_del_activation)),
    same_row(M, "parent_container", "`nn.Sequential(net, nn.ReLU())`: a new parent's `named_parameters()`, `state_dict()`", _parent),
    same_row(M, "backward_hook", "`net[2].register_full_backward_hook(...)` and a forward hook reading the weight", _backward_hook),
    same_row(M, "torch_save_state_dict", "`torch.save(net.state_dict())`, `torch.load(weights_only=True)`", _torch_save),
    same_row(M, "train_eval", "`net.train()` / `net.eval()`, conv + BatchNorm", _train_eval),
]  # fmt: skip
