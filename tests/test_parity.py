"""The parity battery: every operation of the table either gives the same result as on the
unwrapped twin, or is refused clearly before anything changes (see ``tests/parity.py``).

This file adds the rows of optimizers and gradients on ``net.parameters()``, calls
(``torch.compile``, ``torch.func``, forward AD, checkpoint), threads, populations and Hugging
Face utilities; lists the known gaps (``GAPS``); and runs the whole table, one test per row.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from parity import (
    BEFORE,
    MODELS,
    ROWS_MODULE,
    ROWS_UTILS,
    Row,
    close,
    flags,
    flat_of,
    grads_of,
    loss,
    mlp,
    named,
    near,
    pair,
    reference,
    refused_row,
    same,
    same_row,
    same_state,
    user_grads,
)
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from torchreparam import ReparamModule

# ---- optimizers on net.parameters() -----------------------------------------------------
OPT = "Optimizers and gradients on `net.parameters()`"


def _optimizer(model: str, make: Callable[[Any], torch.optim.Optimizer], steps: int = 3) -> Callable[[], None]:  # fmt: skip
    def check() -> None:
        r, twin, x = pair(model)
        pairs = ((make(r.module.parameters()), r.module), (make(twin.parameters()), twin))
        for step in range(steps):
            for opt, module in pairs:
                if isinstance(opt, torch.optim.LBFGS):
                    opt.step(lambda module=module, opt=opt: _closure(module, opt, x))
                    continue
                opt.zero_grad()
                loss(module(*x)).backward()
                opt.step()
            same_state(r.module, twin, f"state_dict after step {step + 1}")
        same(r.flat_param.detach(), flat_of(twin, r), "flat_param after the steps")

    return check


def _closure(module: nn.Module, opt: torch.optim.Optimizer, x: tuple[Any, ...]) -> Tensor:
    opt.zero_grad()
    value = loss(module(*x))
    value.backward()
    return value


def _zero_grad(on: str, set_to_none: bool) -> Callable[[], None]:
    def check() -> None:
        r, twin, x = pair("mlp")
        # the row is about zero_grad: on the module, the wrapper's optimizer holds flat_param
        params = r.module.parameters() if on == "optimizer" else [r.flat_param]
        opts = [torch.optim.SGD(ps, lr=0.1) for ps in (params, twin.parameters())]
        for opt, module in zip(opts, (r.module, twin), strict=True):
            loss(module(*x)).backward()
            (opt if on == "optimizer" else module).zero_grad(set_to_none=set_to_none)
        same(user_grads(r.module), user_grads(twin), "p.grad after zero_grad")
        same(r.flat_param.grad, grads_of(twin, r), "flat_param.grad after zero_grad")
        for opt, module in zip(opts, (r.module, twin), strict=True):
            loss(module(*x)).backward()
            opt.step()
        same_state(r.module, twin, "state_dict after a backward and a step")

    return check


def _requires_grad_net() -> None:
    r, twin, x = pair("mlp")
    for frozen in (True, False):
        r.module.requires_grad_(not frozen)
        twin.requires_grad_(not frozen)
        same(flags(r.module), flags(twin), f"named_parameters() (frozen={frozen})")
        same(r.module(*x).requires_grad, twin(*x).requires_grad, f"net(x).requires_grad (frozen={frozen})")  # fmt: skip
        same(r(*x).requires_grad, twin(*x).requires_grad, f"r(x).requires_grad (frozen={frozen})")
    loss(r.module(*x)).backward()
    loss(twin(*x)).backward()
    same(user_grads(r.module), user_grads(twin), "p.grad after unfreezing")
    same(r.flat_param.grad, grads_of(twin, r), "flat_param.grad after unfreezing")


def _freeze(model: str | Callable[[], nn.Module], op: Callable[[nn.Module], Any]) -> Callable[[], None]:  # fmt: skip
    """``op`` changes some parameters' ``requires_grad``; then SGD on ``net.parameters()``."""

    def check() -> None:
        r, twin, x = pair(model)
        op(r.module)
        op(twin)
        same(flags(r.module), flags(twin), "named_parameters() after")
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (r.module, twin)]
        for opt, module in zip(opts, (r.module, twin), strict=True):
            loss(module(*x)).backward()
            opt.step()
        same(user_grads(r.module), user_grads(twin), "p.grad (None for frozen ones)")
        same_state(r.module, twin, "state_dict after an SGD step")
        theta = near(r)
        same(r(*x, flat_param=theta), reference(twin, r, theta, x), "r(x, flat_param=theta) after")

    return check


def _autograd_grad(model: str) -> Callable[[], None]:
    def check() -> None:
        r, twin, x = pair(model)
        got = torch.autograd.grad(loss(r.module(*x)), r.module.parameters())
        same(got, torch.autograd.grad(loss(twin(*x)), twin.parameters()))

    return check


def _averaged_model() -> None:
    r, twin, x = pair("mlp")
    averaged = [torch.optim.swa_utils.AveragedModel(m) for m in (r.module, twin)]
    for avg, module in zip(averaged, (r.module, twin), strict=True):
        opt = torch.optim.SGD(module.parameters() if module is twin else [r.flat_param], lr=0.5)
        for _ in range(2):
            opt.zero_grad()
            loss(module(*x)).backward()
            opt.step()
            avg.update_parameters(module)
    same(named(averaged[0]), named(averaged[1]), "the averaged model's parameters")
    same(averaged[0](*x), averaged[1](*x), "the averaged model's output")
    same(dict(averaged[0].state_dict()), dict(averaged[1].state_dict()), "its state_dict")


ROWS_OPTIM = [
    same_row(OPT, "sgd", "`SGD(net.parameters(), momentum=0.9)`: 3 steps", _optimizer("mlp", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))),
    same_row(OPT, "adam_tied", "`Adam(net.parameters())`, tied weights", _optimizer("tied", lambda ps: torch.optim.Adam(ps, lr=0.01))),
    same_row(OPT, "adamw_foreach_lstm", "`AdamW(net.parameters(), foreach=True)`, LSTM", _optimizer("lstm", lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=True))),
    same_row(OPT, "adamw_fused", "`AdamW(net.parameters(), fused=True)`", _optimizer("mlp", lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True))),
    same_row(OPT, "lbfgs", "`LBFGS(net.parameters())` with a closure", _optimizer("mlp", lambda ps: torch.optim.LBFGS(ps, lr=0.5, max_iter=4), steps=2)),
    same_row(OPT, "zero_grad_net_none", "`net.zero_grad()` (`set_to_none=True`)", _zero_grad("net", True)),
    same_row(OPT, "zero_grad_net_zeros", "`net.zero_grad(set_to_none=False)`", _zero_grad("net", False)),
    same_row(OPT, "zero_grad_opt_none", "`optimizer.zero_grad()` (`set_to_none=True`)", _zero_grad("optimizer", True)),
    same_row(OPT, "zero_grad_opt_zeros", "`optimizer.zero_grad(set_to_none=False)`", _zero_grad("optimizer", False)),
    same_row(OPT, "requires_grad_net", "`net.requires_grad_(False)`, then `(True)`", _requires_grad_net),
    same_row(OPT, "requires_grad_param", "`net[0].weight.requires_grad_(False)` (one parameter), then SGD", _freeze("mlp", lambda m: m[0].weight.requires_grad_(False))),
    same_row(OPT, "requires_grad_submodule", "`net[0].requires_grad_(False)` (freezing a submodule), then SGD", _freeze("mlp", lambda m: m[0].requires_grad_(False))),
    same_row(OPT, "requires_grad_param_true", "`net[0].weight.requires_grad_(True)` on a model frozen before wrapping, then SGD", _freeze(lambda: mlp().requires_grad_(False), lambda m: m[0].weight.requires_grad_(True))),
    same_row(OPT, "autograd_grad", "`torch.autograd.grad(loss, net.parameters())`", _autograd_grad("mlp")),
    same_row(OPT, "autograd_grad_tied", "`torch.autograd.grad(loss, net.parameters())`, tied weights", _autograd_grad("tied")),
    same_row(OPT, "averaged_model", "`swa_utils.AveragedModel(net)` and `update_parameters(net)`", _averaged_model),
]  # fmt: skip


# ---- calls: torch.compile ---------------------------------------------------------------
class GraphBreaks(nn.Module):
    """An MLP whose forward graph-breaks between its layers: ``print``,
    ``torch._dynamo.graph_break()`` or a branch on ``.item()``."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if self.how == "print":
            print(end="")
        elif self.how == "graph_break":
            torch._dynamo.graph_break()
        elif self.how == "item" and h.sum().item() > 0:
            h = h * 2
        return self.b(h)


def _compare_calls(
    r: ReparamModule, twin: nn.Module, x: tuple[Any, ...], call: Callable[[Tensor], Any], batch: int, exact: bool
) -> None:  # fmt: skip
    """``call(theta)`` against ``functional_call`` in values and gradients w.r.t. ``theta``,
    for two vectors (a compiled graph must not keep the first); then the own weights. Bit for
    bit unless ``exact`` is false (inductor's kernels, vmap's batched ones round differently)."""
    compare = same if exact else close
    for seed in (2, 3):
        theta = near(r, seed, *((batch,) if batch else ()))
        ref = theta.detach().clone().requires_grad_()
        out = call(theta)
        if batch:
            want = torch.stack([reference(twin, r, t, x) for t in ref.unbind()])
        else:
            want = reference(twin, r, ref, x)
        compare(out, want, f"output (vector {seed})")
        loss(out).backward()
        loss(want).backward()
        compare(theta.grad, ref.grad, f"gradient w.r.t. theta (vector {seed})")
    same(r(*x), twin(*x), "r(x) afterwards (its own weights)")
    same(r.module(*x), twin(*x), "net(x) afterwards")


def _compiled(how: str, backend: str, kind: str = "call") -> Callable[[], None]:
    def check() -> None:
        torch._dynamo.reset()
        r, twin, x = pair(lambda: GraphBreaks(how) if how else nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)))  # fmt: skip
        if kind in ("call", "population"):
            f = torch.compile(lambda t, inp: r(inp, flat_param=t), backend=backend)
        elif kind == "block":
            f = torch.compile(_in_block(r), backend=backend)
        elif kind == "method":
            r.compile(backend=backend)
            f = lambda t, inp: r(inp, flat_param=t)  # noqa: E731
        else:  # regional: one submodule
            r.module[0].compile(backend=backend)
            f = lambda t, inp: r(inp, flat_param=t)  # noqa: E731
        batch = 3 if kind == "population" else 0
        exact = backend != "inductor" and not batch
        _compare_calls(r, twin, x, lambda t: f(t, *x), batch, exact)
        torch._dynamo.reset()

    return check


def _in_block(r: ReparamModule) -> Callable[[Tensor, Tensor], Tensor]:
    def f(theta: Tensor, x: Tensor) -> Tensor:
        with r.unflattened_param(theta):
            return r.module(x)

    return f


# ---- calls: torch.func, forward AD, checkpoint ------------------------------------------
_TRANSFORMS: dict[str, Callable[..., Any]] = {  # (f, theta, tangent, thetas) -> result
    "grad": lambda f, t, v, ts: torch.func.grad(lambda u: loss(f(u)))(t),
    "vmap": lambda f, t, v, ts: torch.func.vmap(f)(ts),
    "jvp": lambda f, t, v, ts: torch.func.jvp(f, (t,), (v,)),
    "jacrev": lambda f, t, v, ts: torch.func.jacrev(f)(t),
    "jacfwd": lambda f, t, v, ts: torch.func.jacfwd(f)(t),
    "hessian": lambda f, t, v, ts: torch.func.hessian(lambda u: loss(f(u)))(t),
    "forward_ad": lambda f, t, v, ts: _forward_ad(f, t, v),
}


def _func(transform: str, model: str = "mlp") -> Callable[[], None]:
    def check() -> None:
        r, twin, x = pair(model)
        args = (near(r).detach(), torch.randn(r.param_numel), near(r, 4, 3).detach())
        got = _TRANSFORMS[transform](lambda t: r(*x, flat_param=t), *args)
        want = _TRANSFORMS[transform](lambda t: reference(twin, r, t, x), *args)
        same(got, want, f"torch.func.{transform}")

    return check


def _forward_ad(f: Callable[[Tensor], Tensor], theta: Tensor, tangent: Tensor) -> Any:
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        out = fwad.unpack_dual(f(fwad.make_dual(theta, tangent)))
        return out.primal.clone(), out.tangent.clone()


class Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant
        self.inp = nn.Linear(5, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = checkpoint(self.block, torch.tanh(self.inp(x)), use_reentrant=self.use_reentrant)
        return self.out(torch.tanh(h))


def _checkpoint(use_reentrant: bool) -> Callable[[], None]:
    """Against the twin given theta's values (``functional_call`` is no reference here: torch's
    recomputation reads the module's own weights)."""

    def check() -> None:
        r, twin, x = pair(lambda: Checkpointed(use_reentrant))
        theta = near(r)
        with torch.no_grad():
            for name, value in r.layout.unflatten(theta.detach()).items():
                twin.get_parameter(name).copy_(value)
        out, want = r(*x, flat_param=theta), twin(*x)
        same(out, want, "output")
        loss(out).backward()
        loss(want).backward()
        same(theta.grad, grads_of(twin, r), "gradient w.r.t. theta")
        assert r.flat_param.grad is None, "the module's own weights received a gradient"

    return check


C = "Calls: `torch.compile`, `torch.func`, checkpoint"
ROWS_CALLS = [
    same_row(C, "compile_inductor", "`torch.compile(lambda t, x: r(x, flat_param=t))` (inductor), forward with `torch._dynamo.graph_break()`", _compiled("graph_break", "inductor")),
    same_row(C, "compile_print", "`torch.compile(...)` of `r(x, flat_param=t)`, forward with `print` (aot_eager)", _compiled("print", "aot_eager")),
    same_row(C, "compile_item", "`torch.compile(...)` of `r(x, flat_param=t)`, forward branching on `.item()` (aot_eager)", _compiled("item", "aot_eager")),
    same_row(C, "compile_block", "`torch.compile(...)` of `with r.unflattened_param(t): net(x)` (aot_eager)", _compiled("graph_break", "aot_eager", "block")),
    same_row(C, "compile_population", "`torch.compile(...)` of a population call `r(x, flat_param=thetas)`, `thetas` (3, N)", _compiled("", "aot_eager", "population")),
    same_row(C, "compile_method", "`r.compile()`, then `r(x, flat_param=t)`", _compiled("graph_break", "aot_eager", "method")),
    same_row(C, "compile_regional", "`net[0].compile()` (regional), then `r(x, flat_param=t)`", _compiled("", "aot_eager", "regional")),
    *(same_row(C, f"func_{t}", f"`torch.func.{t}` through `r(x, flat_param=theta)`", _func(t)) for t in ("grad", "vmap", "jvp", "jacrev", "jacfwd", "hessian")),
    same_row(C, "func_grad_tied", "`torch.func.grad` through `r(x, flat_param=theta)`, tied weights", _func("grad", "tied")),
    same_row(C, "func_jacrev_lstm", "`torch.func.jacrev` through `r(x, flat_param=theta)`, LSTM", _func("jacrev", "lstm")),
    same_row(C, "forward_ad", "`torch.autograd.forward_ad`: a dual `theta` into `r(x, flat_param=theta)`", _func("forward_ad")),
    same_row(C, "checkpoint", "`torch.utils.checkpoint(use_reentrant=False)` inside the module", _checkpoint(False)),
    same_row(C, "checkpoint_reentrant", "`torch.utils.checkpoint(use_reentrant=True)` inside the module", _checkpoint(True)),
]  # fmt: skip


# ---- threads and populations ------------------------------------------------------------
def _threads() -> None:
    r, twin, x = pair("lstm")
    thetas = [near(r, 10 + i).detach() for i in range(4)]
    expected = []
    for theta in thetas:
        t = theta.clone().requires_grad_()
        out = reference(twin, r, t, x)
        loss(out).backward()
        expected.append((out.detach(), t.grad))
    results: dict[int, list[Any]] = {i: [] for i in range(4)}
    barrier = threading.Barrier(4)

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(10):
            t = thetas[i].clone().requires_grad_()
            out = r(*x, flat_param=t)
            loss(out).backward()
            results[i].append((out.detach(), t.grad))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(4):
        same(results[i], [expected[i]] * 10, f"thread {i}: outputs and gradients")
    same(r(*x), twin(*x), "r(x) afterwards")


def _concurrent_backward() -> None:
    # 4 threads x 6 backward passes in turn through net(x) and r(x): every gradient adds up, as
    # on the twin (in another order: float32 sums, so close)
    r, twin, x = pair("mlp")
    net = r.module
    inputs = [(x[0] + 0.1 * k,) for k in range(24)]
    calls = [lambda m, inp: m(*inp), lambda m, inp: (r if m is net else m)(*inp)]
    for k, inp in enumerate(inputs):
        loss(calls[k % 2](twin, inp)).backward()
    barrier = threading.Barrier(4)

    def worker(i: int) -> None:
        barrier.wait()
        for k in range(i * 6, (i + 1) * 6):
            loss(calls[k % 2](net, inputs[k])).backward()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    close([p.grad for p in net.parameters()], [p.grad for p in twin.parameters()], "every .grad")
    same(
        r.flat_param.grad,
        torch.cat([p.grad.reshape(-1) for p in net.parameters()]),
        "flat_param.grad: the same memory",
    )


class FloatOut(nn.Module):
    """Returns a tensor and a python float (``.item()`` of the output's sum)."""

    def __init__(self, tensor: bool) -> None:
        super().__init__()
        self.tensor = tensor
        self.lin = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Any:
        y = self.lin(x)
        return (y, y.sum().item()) if self.tensor else y.sum().item()


def _members(value: Any) -> Any:
    """A population's per-member values as a list (from a sequence or a 1-d tensor of them)."""
    if isinstance(value, Tensor):
        return value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else value


def _population_floats(tensor: bool, strategy: str) -> Callable[[], None]:
    def check() -> None:
        r, _, x = pair(lambda: FloatOut(tensor))
        r.population_strategy = strategy
        thetas = near(r, 5, 3).detach()
        loop = [r(*x, flat_param=t) for t in thetas]
        out = r(*x, flat_param=thetas)
        if tensor:
            same(out[0], torch.stack([o[0] for o in loop]), "the tensor output")
            same(_members(out[1]), [o[1] for o in loop], "the float output, per member")
        else:
            same(_members(out), loop, "the float output, per member")

    return check


T = "Threads and populations"
ROWS_THREADS = [
    same_row(T, "threads", "4 threads each calling `r(x, flat_param=theta_i)` and `backward()`, LSTM", _threads),
    same_row(T, "threads_backward", "4 threads each running `backward()` through `net(x)` and `r(x)` in turn", _concurrent_backward),
    same_row(T, "population_float", "a population call of a module returning a python float", _population_floats(False, "auto")),
    same_row(T, "population_tensor_float", "a population call of a module returning `(tensor, float)`", _population_floats(True, "auto")),
    same_row(T, "population_tensor_float_loop", "the same, `population_strategy = 'loop'`", _population_floats(True, "loop")),
]  # fmt: skip


# ---- Hugging Face -----------------------------------------------------------------------
def _logits(module: nn.Module, ids: Tensor, **kw: Any) -> Tensor:
    return module(input_ids=ids, **kw).logits


def _tie_weights() -> None:
    r, twin, (ids,) = pair("gpt2")
    r.module.tie_weights()
    twin.tie_weights()
    same(_logits(r.module, ids), _logits(twin, ids), "logits after tie_weights()")
    same_state(r.module, twin)
    theta = near(r)
    same(_logits(r, ids, flat_param=theta), reference(twin, r, theta, (ids,)).logits, "a call with another vector")  # fmt: skip


def _resize_before(tmp: Path) -> None:
    """The advice of the refusal: resize, then wrap; then train, save and load."""
    from transformers import GPT2LMHeadModel

    def resized() -> nn.Module:
        model = MODELS["gpt2"][0]()
        model.resize_token_embeddings(60)
        return model

    r, twin, _ = pair(resized)
    ids = torch.randint(0, 60, (2, 7))
    for model, module in ((r, r.module), (twin, twin)):
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        module(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        module.save_pretrained(tmp / str(model is r))
    same_state(r.module, twin, "state_dict after an Adam step")
    loaded = [GPT2LMHeadModel.from_pretrained(tmp / str(flag)).eval() for flag in (True, False)]
    same_state(loaded[0], loaded[1], "state_dict of from_pretrained(save_pretrained(...))")
    same(_logits(loaded[0], ids), _logits(twin, ids), "logits of the loaded model")


def _save_pretrained(tmp: Path) -> None:
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    r, twin, (ids,) = pair("gpt2")
    with torch.no_grad():
        r.flat_param.mul_(0.5)
        for p in twin.parameters():
            p.mul_(0.5)
    r.module.save_pretrained(tmp / "wrapped")
    twin.save_pretrained(tmp / "plain")
    files = [load_file(tmp / d / "model.safetensors") for d in ("wrapped", "plain")]
    same(dict(sorted(files[0].items())), dict(sorted(files[1].items())), "the saved tensors")
    loaded = GPT2LMHeadModel.from_pretrained(tmp / "wrapped").eval()
    same(_logits(loaded, ids), _logits(twin, ids), "logits of the loaded model")


def _hf_values(fn: Callable[[nn.Module, Tensor], Any]) -> Callable[[], None]:
    def check() -> None:
        r, twin, (ids,) = pair("gpt2")
        same(fn(r.module, ids), fn(twin, ids))

    return check


def _generate(module: nn.Module, ids: Tensor) -> Tensor:
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    return module.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def _embeddings(module: nn.Module, ids: Tensor) -> Any:
    emb = module.get_input_embeddings()
    return emb(ids), emb is module.transformer.wte, module.get_output_embeddings().weight.detach()


def _counts(m: nn.Module, ids: Tensor) -> Any:
    return m.num_parameters(), m.num_parameters(only_trainable=True), m.num_parameters(exclude_embeddings=True)  # fmt: skip


H = "Hugging Face (a tiny GPT-2)"
ROWS_HF = [
    same_row(H, "hf_tie_weights", "`model.tie_weights()`", _tie_weights),
    refused_row(H, "hf_resize", "`model.resize_token_embeddings(60)` after wrapping", "resize before wrapping", "gpt2",
                lambda r: r.module.resize_token_embeddings(60), r"resiz|wte|embedding|shape", BEFORE),
    same_row(H, "hf_resize_before", "`resize_token_embeddings(60)` before wrapping, then an Adam step, `save_pretrained` / `from_pretrained`", _resize_before),
    same_row(H, "hf_get_input_embeddings", "`model.get_input_embeddings()`, `get_output_embeddings()`", _hf_values(_embeddings)),
    same_row(H, "hf_num_parameters", "`model.num_parameters()` (also `only_trainable`, `exclude_embeddings`)", _hf_values(_counts)),
    same_row(H, "hf_save_pretrained", "`model.save_pretrained(dir)`, `from_pretrained(dir)` (after training `flat_param`)", _save_pretrained),
    same_row(H, "hf_generate", "`model.generate(ids)` (greedy)", _hf_values(_generate)),
]  # fmt: skip

GAPS: dict[str, str] = {  # row -> what goes wrong today (the row is marked xfail(strict=True))
}  # fmt: skip
TABLE: tuple[Row, ...] = tuple(
    dataclasses.replace(row, xfail=f"issue 11: {GAPS[row.name]}") if row.name in GAPS else row
    for row in (*ROWS_UTILS, *ROWS_OPTIM, *ROWS_MODULE, *ROWS_CALLS, *ROWS_THREADS, *ROWS_HF)
)
"""Every row, in the order of the docs page."""

_TMP_ROWS = {"hf_resize_before", "hf_save_pretrained"}


def run_row(row: Row, tmp: Path) -> str | None:
    """Run one row's check (rows that write files get ``tmp``); its refusal message, if any."""
    torch.manual_seed(0)
    return row.check(tmp) if row.name in _TMP_ROWS else row.check()  # type: ignore[call-arg]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params() -> list[Any]:
    marks = lambda row: [pytest.mark.xfail(strict=True, reason=row.xfail)] if row.xfail else []  # noqa: E731
    return [pytest.param(row, id=row.name, marks=marks(row)) for row in TABLE]


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize("row", _params())
def test_parity(row: Row, tmp_path: Path) -> None:
    run_row(row, tmp_path)


def test_the_table_is_consistent() -> None:
    assert len({row.name for row in TABLE}) == len(TABLE)
    assert set(GAPS) <= {row.name for row in TABLE}
    for row in TABLE:
        assert row.answer == "same" or row.answer.startswith("refused: "), row.name
        assert row.xfail is None or row.xfail.startswith("issue 11: "), row.name
