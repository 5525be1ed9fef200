"""The zoo (``tests/zoo.py``): every module torchreparam promises to handle gives the right
numbers in every kind of call, or is refused with its documented error, changing nothing.

One test per entry and check: ``own`` (its own weights: the plain module's outputs, gradients
and state), ``other`` (another vector: the plain copy's values and gradients, and
``functional_call``'s; the vector and the module untouched), ``population:<strategy>`` (P
vectors: the loop of single calls and P plain copies), ``threads`` (a call paused anywhere in
its forward while another thread calls with another vector), ``no_trace`` (nothing of another
vector stays in the module), ``copy`` (deepcopy and pickle after calls), ``refused``.
"""

from __future__ import annotations

import threading

import pytest
import torch
import zoo
from torch import nn
from zoo import one_intra_op_thread  # noqa: F401 (a fixture)

from torchreparam import ReparamModule

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _params() -> list[object]:
    out = []
    for entry in zoo.ZOO:
        for check in zoo.checks_of(entry):
            marks = [pytest.mark.filterwarnings(spec) for spec in entry.warnings]
            reason = zoo.known_failure(entry, check)
            if reason is not None:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            out.append(pytest.param(entry, check, marks=marks, id=f"{entry.name}-{check}"))
    return out


@pytest.mark.parametrize(("entry", "check"), _params())
def test_zoo(entry: zoo.Entry, check: str) -> None:
    zoo.run_check(entry, check)


def test_the_zoo_covers_the_issue() -> None:
    """Every kind of module the reliability issue names is in the zoo."""
    labels = " ".join(e.label for e in zoo.ZOO)
    for kind in [
        "`Linear`", "`Linear(bias=False)`", "`Conv2d", "`ConvTranspose2d(bias=False)`", "`ConvTranspose1d",
        "`BatchNorm", "`LayerNorm`", "`GroupNorm`", "`LSTM`", "`GRU`", "bidirectional", "2 layers",
        "`MultiheadAttention`", "`TransformerEncoder`", "`Embedding(sparse=True)`", "`Embedding(max_norm",
        "parametrizations.weight_norm", "parametrizations.orthogonal", "parametrizations.spectral_norm",
        "registered after wrapping", "`nn.utils.weight_norm`", "hooks", "`complex64`",
        "`next(self.parameters())`", "`.device`", "`.dtype`", "use_reentrant=False", "use_reentrant=True",
    ]:  # fmt: skip
        assert kind in labels, kind
    assert len({e.name for e in zoo.ZOO}) == len(zoo.ZOO)
    for entry in zoo.ZOO:
        assert entry.status in ("supported", "refused"), entry.name
        assert (entry.status == "refused") == (entry.error is not None), entry.name
        for key in entry.xfail:
            assert key.split(":")[0] in zoo.CHECKS, (entry.name, key)
            assert entry.xfail[key].startswith("core: "), (entry.name, key)


# ---- torch.utils.checkpoint: recomputation must see the vector of the call it belongs to ----
CHECKPOINTS = [zoo.BY_NAME["checkpoint"], zoo.BY_NAME["checkpoint_reentrant"]]


def _grads_of_plain_copy(
    entry: zoo.Entry, r: ReparamModule, theta: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    plain = zoo.plain_copy(entry, r, theta)
    plain(x).square().sum().backward()
    return zoo.plain_grads(plain, r)


@pytest.mark.parametrize("entry", CHECKPOINTS, ids=lambda e: e.name)
def test_checkpoint_backward_after_other_calls(entry: zoo.Entry) -> None:
    """Backward of a call made before calls with other vectors (and with the module's own
    weights) recomputes with the first call's vector."""
    r, (x,) = zoo.wrap(entry), zoo.example(entry)
    a, b = zoo.vectors(r, seed=1, scale=0.5), zoo.vectors(r, seed=2, scale=0.5)
    loss_a = r(x, flat_param=a).square().sum()
    loss_b = r(x, flat_param=b).square().sum()
    r(x).sum().backward()  # the module's own weights, in between
    own_grad = r.flat_param.grad.clone()
    loss_b.backward()
    loss_a.backward()
    torch.testing.assert_close(a.grad, _grads_of_plain_copy(entry, r, a, x))
    torch.testing.assert_close(b.grad, _grads_of_plain_copy(entry, r, b, x))
    assert torch.equal(r.flat_param.grad, own_grad), "theta's backward reached flat_param.grad"


@pytest.mark.parametrize("entry", CHECKPOINTS, ids=lambda e: e.name)
def test_checkpoint_backward_in_another_thread(entry: zoo.Entry) -> None:
    r, (x,) = zoo.wrap(entry), zoo.example(entry)
    theta = zoo.vectors(r, scale=0.5)
    loss = r(x, flat_param=theta).square().sum()
    errors: list[BaseException] = []

    def backward() -> None:
        try:
            loss.backward()
        except BaseException as error:  # reported below
            errors.append(error)

    worker = threading.Thread(target=backward)
    worker.start()
    worker.join()
    assert errors == []
    torch.testing.assert_close(theta.grad, _grads_of_plain_copy(entry, r, theta, x))
    assert r.flat_param.grad is None


def test_checkpoint_second_order() -> None:
    """A Hessian-vector product through a non-reentrant checkpoint equals the plain copy's."""
    entry = zoo.BY_NAME["checkpoint"]
    r, (x,) = zoo.wrap(entry), zoo.example(entry)
    theta = zoo.vectors(r, scale=0.5)
    v = torch.randn(r.param_numel)
    (g,) = torch.autograd.grad(r(x, flat_param=theta).square().sum(), theta, create_graph=True)
    (hv,) = torch.autograd.grad(g @ v, theta)
    plain = zoo.plain_copy(entry, r, theta)
    params = [dict(plain.named_parameters())[e.name] for e in r.layout.entries]
    grads = torch.autograd.grad(plain(x).square().sum(), params, create_graph=True)
    flat_g = torch.cat([t.reshape(-1) for t in grads])
    expected = torch.cat([t.reshape(-1) for t in torch.autograd.grad(flat_g @ v, params)])
    torch.testing.assert_close(g, flat_g)
    torch.testing.assert_close(hv, expected)


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("entry", CHECKPOINTS, ids=lambda e: e.name)
def test_checkpoint_with_a_vector_that_needs_no_gradient(entry: zoo.Entry, frozen: bool) -> None:
    """Gradients w.r.t. the input only (dataset distillation, adversarial examples), through a
    checkpoint, with a vector that needs none; the module's own weights trainable or frozen."""
    module = zoo.make(entry).requires_grad_(not frozen)
    r, (x,) = ReparamModule(module), zoo.example(entry)
    theta = zoo.vectors(r, scale=0.5).detach()
    x = x.clone().requires_grad_()
    r(x, flat_param=theta).square().sum().backward()
    plain = zoo.plain_copy(entry, r, theta)
    x2 = x.detach().clone().requires_grad_()
    plain(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert r.flat_param.grad is None


def test_the_wrapped_module_inside_a_plain_module() -> None:
    """A wrapped zoo module used as a part of a bigger plain model, with its own weights."""
    entry = zoo.BY_NAME["transformer_encoder"]
    r, (x,) = zoo.wrap(entry), zoo.example(entry)
    plain = zoo.make(entry)
    outer_r = nn.Sequential(r, nn.Linear(8, 2))
    outer_p = nn.Sequential(plain, nn.Linear(8, 2))
    outer_p[1].load_state_dict(outer_r[1].state_dict())
    torch.testing.assert_close(outer_r(x), outer_p(x), rtol=0, atol=0)


@pytest.mark.filterwarnings(
    "ignore:There is a performance drop:UserWarning"
)  # torch: vmap fallback
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
@pytest.mark.parametrize("call", ["single", "loop", "vmap"])
def test_max_norm_never_writes_the_callers_vector(call: str, mode: str) -> None:
    """Embedding(max_norm): the caller's vector is read, never renormalized in place (in any
    grad mode: under no_grad an in-place write would not even bump its version)."""
    entry = zoo.BY_NAME["embedding_max_norm"]
    r, (idx,) = zoo.wrap(entry), zoo.example(entry)
    theta = zoo.vectors(r, *((3,) if call != "single" else ()), scale=1.0).detach()
    before, version = theta.clone(), theta._version
    if call != "single":
        r.population_strategy = call  # type: ignore[assignment]
    context = {
        "grad": torch.enable_grad,
        "no_grad": torch.no_grad,
        "inference_mode": torch.inference_mode,
    }[mode]
    with context():
        out = r(idx, flat_param=theta if mode != "grad" else theta.requires_grad_())
    assert torch.equal(theta.detach(), before)
    assert theta._version == version
    rows = [theta] if call == "single" else list(theta)
    for i, t in enumerate(rows):
        expected = zoo.plain_copy(entry, r, t)(idx)
        torch.testing.assert_close(out if call == "single" else out[i], expected)
