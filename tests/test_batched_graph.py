"""The graph plan (a forward traced by torch.fx, run for all members by a rule per layer) equals
the loop of single calls in values and gradients; fuzzed over random residual and attention
architectures. The loop is forbidden where the plan must compute the result itself."""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import unchanged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from torchreparam import ReparamModule, _population_job, explain_population
from torchreparam._batched_graph import GraphPlan


@pytest.fixture(autouse=True)
def _float64() -> Any:
    """Float64 models and inputs in this module's tests (tight comparisons with the loop)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.fixture
def no_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the population fell back to the loop")

    monkeypatch.setattr(_population_job.Job, "loop", fail)


class Residual(nn.Module):
    def __init__(self, channels: int, groups: int = 1, norm: str = "bn") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, groups=groups)
        self.norm = nn.BatchNorm2d(channels) if norm == "bn" else nn.GroupNorm(2, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.scale = 0.5  # a plain attribute the graph bakes in

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm(self.conv1(x)))
        out = self.conv2(out) * self.scale
        out += x
        return F.relu(out)


class Attention(nn.Module):
    """A transformer block: projections, heads by view/transpose, SDPA, residuals, LayerNorm."""

    def __init__(self, width: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.out(y)
        return x + self.mlp(self.norm2(x))


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.block = Attention()
        self.head = nn.Linear(8, 3)

    def forward(self, idx: Tensor) -> dict[str, Tensor]:
        h = self.block(self.emb(idx))
        return {"logits": self.head(h), "pooled": h.mean(dim=1)}


class MhaBlock(nn.Module):
    """A transformer block around ``nn.MultiheadAttention`` (pre-norm, residuals, MLP)."""

    def __init__(self, width: int = 8, heads: int = 2, batch_first: bool = True) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class Mha(nn.Module):
    """``nn.MultiheadAttention`` called with the inputs named in ``roles`` (query ``x``, key
    ``k``, value ``v``, ``kpm``, ``mask``), returning the weights where it has them."""

    def __init__(self, roles: tuple[str, ...], call: dict[str, Any], **options: Any) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, **options)
        self.roles, self.call = roles, call

    def forward(self, a: Tensor, b: Any = None, c: Any = None, d: Any = None, e: Any = None) -> Any:
        given = dict(zip(self.roles, (a, b, c, d, e), strict=False))
        x = given["x"]
        k = given.get("k", x)
        out, weights = self.attn(
            x, k, given.get("v", k), key_padding_mask=given.get("kpm"),
            attn_mask=given.get("mask"), **self.call,
        )  # fmt: skip
        return out if weights is None else (out, weights)


def resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), Residual(4), Residual(4, groups=2, norm="gn"),
        nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip


def conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2), nn.GroupNorm(2, 4), nn.SiLU(), nn.AvgPool1d(2),
        nn.Flatten(), nn.Linear(8, 3), nn.LogSoftmax(dim=-1),
    )  # fmt: skip


MODELS: dict[str, tuple[Any, Any]] = {
    "resnet": (resnet, lambda: torch.randn(3, 1, 6, 6)),
    "conv1d": (conv1d, lambda: torch.randn(3, 2, 9)),
    "attention": (Attention, lambda: torch.randn(2, 5, 8)),
    "tokens": (Tokens, lambda: torch.randint(0, 11, (2, 5))),
    "pool_first": (  # (a shared input pooled once, then every member's layers)
        lambda: nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3)),
        lambda: torch.randn(3, 1, 6, 6),
    ),
    "mha_block": (MhaBlock, lambda: torch.randn(2, 5, 8)),
    "mha_seq_first": (lambda: MhaBlock(batch_first=False), lambda: torch.randn(5, 2, 8)),
}


def _loop(r: ReparamModule, thetas: Tensor, x: Any, per_member: Any, **kw: Any) -> Any:
    """The loop of single calls, stacked. ``x``: one input or a tuple of them; ``per_member``:
    whether each has a leading population dimension (one flag for all, or one per input)."""
    xs = x if isinstance(x, tuple) else (x,)
    flags = per_member if isinstance(per_member, tuple) else (per_member,) * len(xs)
    outs = [
        r(*(a[i] if f else a for a, f in zip(xs, flags, strict=True)), flat_param=t, **kw)
        for i, t in enumerate(thetas)
    ]
    return tree_map(lambda *leaves: torch.stack(leaves), *outs)


def _check(r: ReparamModule, thetas: Tensor, x: Any, per_member: Any, **kw: Any) -> None:
    """The batched call against the loop: values and gradients (of vectors and inputs)."""
    xs = x if isinstance(x, tuple) else (x,)
    flags = per_member if isinstance(per_member, tuple) else (per_member,) * len(xs)
    ref_thetas = thetas.detach().clone().requires_grad_()
    refs_x = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in xs)
    r.population_strategy = "batched"
    dims = tuple(0 if f else None for f in flags)
    out = r(*xs, flat_param=thetas, in_dims=dims, **kw)
    r.population_strategy = "loop"
    expected = _loop(r, ref_thetas, refs_x, flags, **kw)
    torch.testing.assert_close(out, expected)
    leaves, refs = tree_flatten(out)[0], tree_flatten(expected)[0]
    cots = [torch.randn_like(t) for t in leaves]
    wanted = [thetas, *(a for a in xs if a.requires_grad)]
    got = torch.autograd.grad(sum((t * c).sum() for t, c in zip(leaves, cots, strict=True)), wanted)
    want = torch.autograd.grad(
        sum((t * c).sum() for t, c in zip(refs, cots, strict=True)),
        [ref_thetas, *(a for a in refs_x if a.requires_grad)],
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per_member"])
@pytest.mark.parametrize("name", list(MODELS))
def test_graph_plan_equals_the_loop(name: str, per_member: bool) -> None:
    make, inputs = MODELS[name]
    r = ReparamModule(make()).eval()
    x = inputs()
    population = 3
    if per_member:
        x = torch.stack([inputs() for _ in range(population)])
    x = x.requires_grad_(x.is_floating_point())
    thetas = r.fresh_flat_param(population) + 0.05 * torch.randn(3, r.param_numel)
    with pytest.MonkeyPatch.context() as patch:  # the plan computes it all: no loop
        original = _population_job.Job.loop
        patch.setattr(_population_job.Job, "loop", lambda *a, **k: pytest.fail("loop ran"))
        r.population_strategy = "batched"
        r(x, flat_param=thetas, in_dims=0 if per_member else None)
        patch.setattr(_population_job.Job, "loop", original)
    _check(r, thetas.requires_grad_(), x, per_member)
    assert isinstance(r._core.memo.get("graph"), GraphPlan)


MHA_CASES: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    # id: (module options, call options, inputs: x k v, kpm bool/float, mask 2d/3d/causal)
    "self": ({"batch_first": True}, {"need_weights": False}, "x"),
    "self_weights": ({"batch_first": True}, {}, "x"),
    "per_head_weights": ({}, {"average_attn_weights": False}, "x"),
    "seq_first_masks": ({}, {"need_weights": False}, "x kpm:bool mask:2d"),
    "float_masks_weights": ({"batch_first": True}, {}, "x kpm:float mask:3d"),
    "causal": ({"batch_first": True}, {"need_weights": False, "is_causal": True}, "x mask:causal"),
    "causal_padding": ({"batch_first": True}, {"is_causal": True}, "x kpm:bool mask:causal"),
    "bias_kv_zero_attn": (
        {"batch_first": True, "add_bias_kv": True, "add_zero_attn": True},
        {"need_weights": False}, "x kpm:bool mask:3d",
    ),
    "cross_kdim_vdim": ({"kdim": 6, "vdim": 5}, {}, "x k v kpm:bool"),
    "cross_kdim_vdim_sdpa": (
        {"batch_first": True, "kdim": 6, "vdim": 5, "add_bias_kv": True},
        {"need_weights": False}, "x k v mask:2d",
    ),
    "unbatched": ({}, {"need_weights": False}, "x- kpm:bool mask:3d"),
    "unbatched_weights": ({"add_zero_attn": True}, {}, "x- k- v- mask:2d"),
}  # fmt: skip


def _mha_inputs(options: dict[str, Any], spec: str) -> dict[str, Tensor]:
    """The inputs of an MHA case: batch 2, target length 3, source length 4 (cross-attention)."""
    words = spec.split()
    batched = not words[0].endswith("-")
    cross = any(w.startswith("k") and not w.startswith("kpm") for w in words)
    n, target = 2, 3
    source = 4 if cross else target

    def sequence(length: int, features: int) -> Tensor:
        if not batched:
            return torch.randn(length, features)
        return torch.randn(*((n, length) if options.get("batch_first") else (length, n)), features)

    made = {"x": sequence(target, 8)}
    for word in words[1:]:
        name, _, kind = word.rstrip("-").partition(":")
        if name in ("k", "v"):
            made[name] = sequence(source, options.get("kdim" if name == "k" else "vdim", 8))
        elif name == "kpm":
            kpm = torch.zeros((n, source) if batched else (source,), dtype=torch.bool)
            kpm[..., -1] = True  # (the last key of every row: no row is all masked)
            made[name] = kpm if kind == "bool" else kpm.double() * -1e9
        else:
            if kind == "causal":
                mask = torch.ones(target, source, dtype=torch.bool).triu(1)
            else:
                shape = (
                    (target, source)
                    if kind == "2d"
                    else ((n if batched else 1) * 2, target, source)
                )
                mask = torch.rand(shape) < 0.3
                mask[..., 0] = False
            made[name] = mask.double() * -1e9 if "kpm:float" in words else mask
    return made


@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per_member"])
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention_equals_the_loop(case: str, per_member: bool, no_loop: None) -> None:
    options, call, spec = MHA_CASES[case]
    inputs = _mha_inputs(options, spec)
    r = ReparamModule(Mha(tuple(inputs), call, **options)).eval()
    population = 3
    flags = tuple(per_member and t.is_floating_point() for t in inputs.values())
    xs = tuple(
        torch.stack([t + 0.1 * torch.randn_like(t) for _ in range(population)]) if f else t
        for t, f in zip(inputs.values(), flags, strict=True)
    )
    xs = tuple(t.requires_grad_(t.is_floating_point()) for t in xs)
    thetas = r.fresh_flat_param(population) + 0.1 * torch.randn(population, r.param_numel)
    _check(r, thetas.requires_grad_(), xs, flags)
    text = explain_population(
        r, *xs, flat_param=thetas, in_dims=tuple(0 if f else None for f in flags)
    )
    assert "layers by rule: MultiheadAttention" in text
    assert "under vmap" not in text


def test_multihead_attention_dropout_in_train_mode_is_refused() -> None:
    r = ReparamModule(MhaBlock())
    r.module.attn.dropout = 0.1  # (train mode: each member draws its own dropout mask)
    x, thetas = torch.randn(2, 5, 8), r.fresh_flat_param(3)
    message = "module 'attn' (MultiheadAttention draws random numbers (dropout in train mode"
    assert message in explain_population(r, x, flat_param=thetas)
    r.population_strategy = "batched"
    with unchanged(r), pytest.raises(ValueError, match=re.escape(message)):
        r(x, flat_param=thetas)
    r.eval()  # no dropout in eval mode: the rule runs
    _check(r, thetas.requires_grad_(), x.requires_grad_(), False)


def test_per_member_batchnorm_statistics_in_eval_mode(no_loop: None) -> None:
    r = ReparamModule(resnet()).eval()
    population = 3
    stats = [b.expand(population, *b.shape).clone() for b in r.module.buffers()]
    for b in stats:
        if b.is_floating_point():
            b.uniform_(0.5, 1.5)
    thetas, x = r.fresh_flat_param(population), torch.randn(2, 1, 6, 6)
    r.population_strategy = "batched"
    out = r(x, flat_param=thetas, buffers=stats)
    expected = torch.stack(
        [r(x, flat_param=t, buffers=[b[i] for b in stats]) for i, t in enumerate(thetas)]
    )
    torch.testing.assert_close(out, expected)


def test_a_baked_attribute_changed_is_traced_again(no_loop: None) -> None:
    r = ReparamModule(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), Residual(2))).eval()
    thetas, x = r.fresh_flat_param(2), torch.randn(2, 1, 5, 5)
    r.population_strategy = "batched"
    first = r(x, flat_param=thetas)
    r.module[1].scale = 2.0
    second = r(x, flat_param=thetas)
    r.module[1].train()  # BatchNorm in train mode updates the statistics all members share
    with pytest.raises(ValueError, match=re.escape("'batched' would update buffers shared")):
        r(x, flat_param=thetas)
    r.module[1].eval()
    torch.testing.assert_close(second, _loop(r, thetas, x, per_member=False))
    assert not torch.allclose(first, second)


class InPlaceOnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        x += 1
        return self.lin(x)


class Hooked(Residual):
    def __init__(self) -> None:
        super().__init__(2)
        self.conv2.register_forward_hook(lambda m, i, o: o * 3)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (InPlaceOnInput, "iadd changes in place a value that is not a layer's"),
        (Hooked, "module 'conv2' (Conv2d) has hooks or a patched forward/__call__"),
        (lambda: nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)), "dropout draws random"),
    ],
    ids=["inplace_input", "hook", "dropout"],
)
def test_what_the_graph_cannot_run_exactly_is_refused(make: Any, message: str) -> None:
    r = ReparamModule(make())
    if isinstance(r.module, Residual):
        r.eval()
    x = torch.randn(2, 2, 4, 4) if isinstance(r.module, Residual) else torch.randn(2, 3)
    thetas = r.fresh_flat_param(2)
    r.population_strategy = "batched"
    with unchanged(r), pytest.raises(ValueError, match=re.escape(message)):
        r(x.clone(), flat_param=thetas)
    r.population_strategy = "auto"
    torch.manual_seed(0)
    got = r(x.clone(), flat_param=thetas)
    torch.manual_seed(0)
    torch.testing.assert_close(got, _loop(r, thetas, x.clone(), per_member=False))


def test_explain_says_what_runs_and_why() -> None:
    r = ReparamModule(resnet()).eval()
    thetas, x = r.fresh_flat_param(4), torch.randn(2, 1, 6, 6)
    text = explain_population(r, x, flat_param=thetas)
    assert (
        "by rule: AdaptiveAvgPool2d, BatchNorm2d, Conv2d, Flatten, GroupNorm, Linear, Max" in text
    )
    assert "auto: this signature is new" in text
    with torch.no_grad():
        r(x, flat_param=thetas)
        text = explain_population(r, x, flat_param=thetas)
    chosen = re.search(r"auto: chose '(\w+)' for this signature \(trial: batched .* ms, vmap", text)
    assert chosen is not None
    assert chosen.group(1) in ("batched", "vmap", "loop")
    r.train()  # BatchNorm updates the statistics all members share: only the loop is exact
    text = explain_population(r, x, flat_param=thetas)
    assert "vmap: may not run" in text
    r.module[1].conv1.register_forward_hook(lambda m, i, o: o)
    text = explain_population(r, x, flat_param=thetas)
    assert "batched plan: none (module '1.conv1' (Conv2d) has hooks" in text
    mlp = ReparamModule(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    text = explain_population(mlp, torch.randn(2, 3), flat_param=mlp.fresh_flat_param(2))
    assert "the multilayer perceptron's" in text


# ---- fuzz ------------------------------------------------------------------------------------
@st.composite
def architectures(draw: st.DrawFn) -> tuple[nn.Module, tuple[int, ...]]:
    kind = draw(st.sampled_from(["conv", "attention", "multihead"]))
    if kind in ("attention", "multihead"):
        heads = draw(st.sampled_from([1, 2, 4]))
        width = heads * draw(st.integers(1, 3))
        first = kind == "attention" or draw(st.booleans())  # (batch_first: this layout)
        blocks = [
            Attention(width, heads) if kind == "attention" else MhaBlock(width, heads, first)
            for _ in range(draw(st.integers(1, 2)))
        ]
        return nn.Sequential(*blocks, nn.Linear(width, 2)), (draw(st.integers(1, 3)), draw(
            st.integers(1, 4)), width)  # fmt: skip
    channels = draw(st.sampled_from([2, 4]))
    layers: list[nn.Module] = [
        nn.Conv2d(1, channels, draw(st.sampled_from([1, 3])), padding="same"),
    ]
    for _ in range(draw(st.integers(0, 2))):
        groups = draw(st.sampled_from([1, 2]))
        layers.append(Residual(channels, groups, draw(st.sampled_from(["bn", "gn"]))))
    layers.append(draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Identity()])))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 2)]
    return nn.Sequential(*layers), (draw(st.integers(1, 3)), 1, 4, 4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(architectures(), st.integers(1, 4), st.booleans(), st.integers(0, 2**31 - 1))
def test_random_residual_and_attention_models_match_the_loop(
    arch: tuple[nn.Module, tuple[int, ...]], population: int, per_member: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    module, shape = arch
    r = ReparamModule(module).eval()
    for b in r.module.buffers():  # statistics other than the initial zeros and ones
        if b.is_floating_point():
            b.uniform_(0.5, 1.5)
    x = torch.randn(population, *shape) if per_member else torch.randn(*shape)
    thetas = r.fresh_flat_param(population) + 0.1 * torch.randn(population, r.param_numel)
    _check(r, thetas.requires_grad_(), x.requires_grad_(), per_member)


def test_batchnorm_in_train_mode_updates_each_members_statistics(no_loop: None) -> None:
    r = ReparamModule(resnet())  # train mode: BatchNorm updates its statistics
    stats = [b.expand(3, *b.shape).clone() for b in r.module.buffers()]
    r.population_strategy = "batched"
    r(torch.randn(4, 1, 6, 6), flat_param=r.fresh_flat_param(3), buffers=stats)  # no loop
    assert stats[2].tolist() == [1, 1, 1]  # the first BatchNorm's num_batches_tracked
    assert not torch.equal(stats[0][0], torch.zeros(4))  # its running mean moved
    with pytest.raises(ValueError, match=re.escape("'batched' would update buffers shared")):
        r(torch.randn(4, 1, 6, 6), flat_param=r.fresh_flat_param(3))  # shared statistics


def test_batchnorm_in_train_mode_equals_the_loop() -> None:
    r = ReparamModule(resnet())
    population = 3
    stats = [b.expand(population, *b.shape).clone() for b in r.module.buffers()]
    theirs = [b.clone() for b in stats]
    thetas = r.fresh_flat_param(population).requires_grad_()
    ref = thetas.detach().clone().requires_grad_()
    x = torch.randn(4, 1, 6, 6)
    for _ in range(2):  # twice: the statistics move on from the first call's
        r.population_strategy = "batched"
        out = r(x, flat_param=thetas, buffers=stats)
        r.population_strategy = "loop"
        expected = r(x, flat_param=ref, buffers=theirs)
        torch.testing.assert_close(out, expected)
        for mine, loop in zip(stats, theirs, strict=True):
            torch.testing.assert_close(mine, loop)
        got = torch.autograd.grad(out.square().sum(), thetas)[0]
        torch.testing.assert_close(got, torch.autograd.grad(expected.square().sum(), ref)[0])
    assert all(int(b) == 0 for b in r.module.buffers() if not b.is_floating_point())


class _Rendezvous(nn.Module):
    """Lets another thread run while the graph plan traces this module's forward."""

    def __init__(self, tracing: Any, resume: Any) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.tracing, self.resume = tracing, resume

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):  # (only while traced)
            self.tracing.set()
            assert self.resume.wait(30)
        return self.lin(x).tanh()


def test_tracing_leaves_other_threads_calls_alone(no_loop: None) -> None:
    """Another thread calls a plain model (a Linear, a Sequential, attribute reads) while the
    graph plan traces: it gets the plain results, and the population equals the loop."""
    tracing, resume = threading.Event(), threading.Event()
    r = ReparamModule(_Rendezvous(tracing, resume))
    plain = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with torch.no_grad():
        expected = plain(x)
    seen: dict[str, Any] = {}

    def other() -> None:
        try:
            assert tracing.wait(30)
            with torch.no_grad():
                seen["out"] = plain(x)
                seen["weight"] = plain[0].weight
        except BaseException as error:  # (reported in the main thread)
            seen["error"] = error
        finally:
            resume.set()

    thread = threading.Thread(target=other)
    thread.start()
    thetas = r.fresh_flat_param(3)
    r.population_strategy = "batched"
    out = r(x, flat_param=thetas)
    thread.join(30)
    assert "error" not in seen, seen.get("error")
    assert type(seen["out"]) is Tensor
    assert torch.equal(seen["out"], expected)
    assert type(seen["weight"]) is nn.Parameter
    torch.testing.assert_close(out, _loop(r, thetas, x, per_member=False))
