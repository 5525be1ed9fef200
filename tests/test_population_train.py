"""Populations that train: fresh initializations, members checked out as plain modules and
written back, per-member hyperparameters, BatchNorm statistics per member. References: fresh
models built from the same seed, and each member trained alone as a plain module by torch.optim.
"""

from __future__ import annotations

import copy
import io
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import Tied, snapshot
from torch import Tensor, nn

from torchreparam import ReparamModule, adam, member_module, member_vector, sgd


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )


def test_fresh_flat_param_draws_n_independent_initializations() -> None:
    r = ReparamModule(bn_cnn())
    before = snapshot(r)
    torch.manual_seed(7)
    thetas = r.fresh_flat_param(3)
    torch.manual_seed(7)
    fresh = [r.layout.flatten(dict(bn_cnn().named_parameters())) for _ in range(3)]
    assert thetas.shape == (3, r.param_numel)
    assert not thetas.requires_grad
    assert torch.equal(thetas, torch.stack(fresh))  # as three models built from that seed
    assert all(not torch.equal(thetas[0], t) for t in thetas[1:])
    after = snapshot(r)
    assert all(torch.equal(before[k], after[k]) for k in before)  # own weights, buffers kept
    torch.manual_seed(7)
    assert torch.equal(r.fresh_flat_param(), fresh[0])  # (one vector, as before)
    for bad in (0, -1, 2.0, True):
        message = f"n must be None or a positive int (members to draw), got {bad!r}"
        with pytest.raises(ValueError, match=re.escape(message)):
            r.fresh_flat_param(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("make", [bn_cnn, Tied])
def test_a_member_checked_out_is_a_plain_module_and_comes_back(make: type[nn.Module]) -> None:
    r = ReparamModule(make())
    thetas = r.fresh_flat_param(4)
    x = torch.randn(2, 1, 8, 8) if make is bn_cnn else torch.randint(0, 10, (2, 5))
    stats = [b.expand(4, *b.shape).clone() for b in r.module.buffers()]
    for b in stats:
        if b.is_floating_point():
            b.uniform_(0.5, 1.5)
    r.eval()
    member = [b[2] for b in stats]
    plain = member_module(r, thetas[2], buffers=member)
    assert all("torchreparam" not in type(m).__module__ for m in plain.modules())
    assert b"torchreparam" not in pickle.dumps(plain)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in make().named_parameters()]
    assert not plain.training
    torch.testing.assert_close(plain(x), r(x, flat_param=thetas[2], buffers=member), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(plain, buffer)  # plain torch, whole module
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), plain(x), rtol=0, atol=0)
    fresh = make().eval()
    fresh.load_state_dict(plain.state_dict())  # and by state dict into a fresh model
    torch.testing.assert_close(fresh(x), plain(x), rtol=0, atol=0)
    with torch.no_grad():  # its own storage: changing it changes no member
        next(plain.parameters()).add_(1.0)
    assert torch.equal(thetas, thetas.clone())
    back = member_vector(r, plain)
    assert back.shape == (r.param_numel,)
    assert not torch.equal(back, thetas[2])
    with torch.no_grad():  # fine-tuned alone, written back into the population
        thetas[2] = back
        for b, (name, _) in zip(stats, r.module.named_buffers(), strict=True):
            b[2] = plain.get_buffer(name)
    torch.testing.assert_close(r(x, flat_param=thetas, buffers=stats)[2], plain(x), rtol=0, atol=0)
    assert torch.equal(member_vector(r, member_module(r, thetas[1])), thetas[1])


def test_member_checkout_errors() -> None:
    r = ReparamModule(mlp())
    with pytest.raises(ValueError, match=re.escape("got shape (2, 67); for a population")):
        member_module(r, torch.zeros(2, r.param_numel))
    with pytest.raises(ValueError, match=re.escape("'0.weight' has shape (3, 4), expected")):
        member_vector(r, nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(8, 3)))
    with pytest.raises(TypeError, match="r must be a ReparamModule, got Sequential"):
        member_module(mlp(), torch.zeros(67))  # type: ignore[arg-type]


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


def _members_alone(thetas: Tensor, opt_for: object, steps: int) -> Tensor:
    """Each row trained alone as a plain model by its own torch.optim optimizer."""
    x, y = _data()
    r = ReparamModule(mlp())
    out = []
    for i, theta in enumerate(thetas):
        plain = member_module(r, theta)
        opt = opt_for(i, plain.parameters())  # type: ignore[operator]
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(plain(x), y).backward()
            opt.step()
        out.append(member_vector(r, plain))
    return torch.stack(out)


def _population_grads(r: ReparamModule, thetas: Tensor) -> Tensor:
    x, y = _data()
    logits = r(x, flat_param=thetas, in_dims=(None,))  # (P, 16, 3)
    losses = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(thetas)), reduction="none")
    return torch.autograd.grad(losses.view(len(thetas), -1).mean(1).sum(), thetas)[0]


def test_per_member_sgd_hyperparameters_as_p_by_1_tensors() -> None:
    r = ReparamModule(mlp())
    thetas = r.fresh_flat_param(4).requires_grad_()
    lr = torch.tensor([[0.3], [0.1], [0.03], [0.0]])  # (P, 1): a sweep in one run
    momentum = torch.tensor([[0.0], [0.9], [0.5], [0.9]])
    decay = torch.tensor([[0.0], [0.01], [0.1], [0.0]])
    start, state = thetas.detach().clone(), None
    for _ in range(5):
        grads = _population_grads(r, thetas)
        new, state = sgd(
            thetas.detach(), grads, state, lr=lr, momentum=momentum, weight_decay=decay
        )
        thetas = new.requires_grad_()

    def opt_for(i: int, params: object) -> torch.optim.Optimizer:
        h = (lr[i].item(), momentum[i].item(), decay[i].item())
        return torch.optim.SGD(params, lr=h[0], momentum=h[1], weight_decay=h[2])  # type: ignore[arg-type]

    torch.testing.assert_close(thetas.detach(), _members_alone(start, opt_for, 5))
    assert torch.equal(thetas[3], start[3])  # lr 0: unchanged


def test_per_member_adam_hyperparameters_as_p_by_1_tensors() -> None:
    r = ReparamModule(mlp())
    thetas = r.fresh_flat_param(3).requires_grad_()
    lr, decay = torch.tensor([[1e-2], [1e-3], [3e-2]]), torch.tensor([[0.0], [0.1], [0.01]])
    beta1 = torch.tensor([[0.9], [0.8], [0.5]])
    start, state = thetas.detach().clone(), None
    for _ in range(5):
        grads = _population_grads(r, thetas)
        new, state = adam(
            thetas.detach(), grads, state, lr=lr, betas=(beta1, 0.999), weight_decay=decay
        )
        thetas = new.requires_grad_()

    def opt_for(i: int, params: object) -> torch.optim.Optimizer:
        betas = (beta1[i].item(), 0.999)
        return torch.optim.Adam(params, lr=lr[i].item(), betas=betas, weight_decay=decay[i].item())  # type: ignore[arg-type]

    torch.testing.assert_close(thetas.detach(), _members_alone(start, opt_for, 5))


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"])
def test_torch_optim_on_the_population_parameter(name: str) -> None:
    # torch.optim keeps element-wise state, so on one (P, N) parameter every member has its own
    # (shared scalar hyperparameters): equal to each member trained alone. A (P, 1) tensor
    # learning rate is refused by torch ("Tensor lr must be 1-element"): use sgd/adam for that.
    r = ReparamModule(mlp())
    start = r.fresh_flat_param(3)
    kwargs = {"lr": 0.01, "weight_decay": 0.01}
    thetas = nn.Parameter(start.clone())
    opt = getattr(torch.optim, name)([thetas], **kwargs)
    for _ in range(4):
        opt.zero_grad()
        thetas.grad = _population_grads(r, thetas)
        opt.step()
    alone = _members_alone(start, lambda i, p: getattr(torch.optim, name)(p, **kwargs), 4)
    torch.testing.assert_close(thetas.detach(), alone)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        getattr(torch.optim, name)([thetas], lr=torch.full((3, 1), 0.01))


@pytest.mark.parametrize("strategy", ["vmap", "loop", "auto", "batched"])
def test_a_batchnorm_cnn_population_trains_as_its_members_alone(strategy: str) -> None:
    torch.manual_seed(0)
    r = ReparamModule(bn_cnn())  # train mode: BatchNorm updates each member's statistics
    r.population_strategy = strategy  # type: ignore[assignment]
    P = 3
    thetas = nn.Parameter(r.fresh_flat_param(P))
    stats = [b.expand(P, *b.shape).clone() for b in r.module.buffers()]  # per member
    plains = [member_module(r, t) for t in thetas.detach()]
    opt = torch.optim.SGD([thetas], lr=0.1, momentum=0.9)
    opts = [torch.optim.SGD(p.parameters(), lr=0.1, momentum=0.9) for p in plains]
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        x, y = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
        logits = r(x, flat_param=thetas, buffers=stats)  # (P, 6, 3)
        loss = sum(F.cross_entropy(logit, y) for logit in logits)
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        for plain, o in zip(plains, opts, strict=True):
            o.zero_grad()
            F.cross_entropy(plain(x), y).backward()
            o.step()
    for i, plain in enumerate(plains):
        torch.testing.assert_close(thetas[i].detach(), member_vector(r, plain))
        for b, (name, _) in zip(stats, r.module.named_buffers(), strict=True):
            torch.testing.assert_close(b[i], plain.get_buffer(name))
    assert int(r.module[1].num_batches_tracked) == 0  # the module's own: untouched
    assert copy.deepcopy(plains[0]).training
