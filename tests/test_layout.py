"""The layout: a value, the original's contract, exact round trips."""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
from conftest import MODELS, Tied, mlp
from torch import nn

from torchreparam import FlatLayout, LayoutEntry


@pytest.mark.parametrize("name", list(MODELS))
def test_flatten_is_the_original_contract(name: str) -> None:
    net = MODELS[name][0]()
    layout = FlatLayout.from_module(net)
    expected = torch.cat([p.reshape(-1) for p in net.parameters()])
    flat = layout.flatten(dict(net.named_parameters()))
    assert torch.equal(flat, expected)
    assert layout.numel == expected.numel() == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_unflatten_round_trips_exactly_and_shares_storage(name: str) -> None:
    net = MODELS[name][0]()
    layout = FlatLayout.from_module(net)
    flat = torch.randn(layout.numel)
    views = layout.unflatten(flat)
    assert list(views) == list(layout.names)
    for (pname, param), entry in zip(net.named_parameters(), layout, strict=True):
        assert views[pname].shape == param.shape
        assert views[pname].data_ptr() == flat[entry.offset :].data_ptr()  # a view, no copy
    assert torch.equal(layout.flatten(views), flat)


def test_tied_weights_are_stored_once_with_aliases() -> None:
    net = Tied()
    layout = FlatLayout.from_module(net)
    assert layout.names == ("emb.weight", "mid.weight", "mid.bias")
    assert layout["emb.weight"].aliases == ("out.weight",)
    assert layout["out.weight"] is layout["emb.weight"]
    flat = torch.randn(layout.numel)
    with_aliases = layout.unflatten(flat, aliases=True)
    assert with_aliases["out.weight"] is with_aliases["emb.weight"]
    # A tied parameter may be given under any of its names.
    by_alias = {k: v for k, v in with_aliases.items() if k != "emb.weight"}
    assert torch.equal(layout.flatten(by_alias), flat)


def test_slices_and_views_address_one_parameter() -> None:
    net = mlp()
    layout = FlatLayout.from_module(net)
    flat = layout.flatten(dict(net.named_parameters()))
    entry = layout["2.weight"]
    assert entry == LayoutEntry("2.weight", (3, 7), offset=5 * 7 + 7, aliases=())
    assert torch.equal(flat[entry.slice].view(entry.shape), net[2].weight)
    assert torch.equal(layout.view(flat, "2.weight"), net[2].weight)
    batch = torch.stack([flat, 2 * flat])  # (2, N): views keep the leading dimension
    assert torch.equal(layout.view(batch, "2.bias"), torch.stack([net[2].bias, 2 * net[2].bias]))
    assert layout.unflatten(batch)["0.weight"].shape == (2, 7, 5)


def test_layout_is_a_hashable_picklable_value() -> None:
    a, b = FlatLayout.from_module(mlp()), FlatLayout.from_module(mlp())
    assert a == b
    assert hash(a) == hash(b)
    assert {a: 1}[b] == 1
    assert pickle.loads(pickle.dumps(a)) == a
    assert copy.deepcopy(a)["0.bias"] == a["0.bias"]
    assert a != FlatLayout.from_module(Tied())
    with pytest.raises(AttributeError):
        a.dtype = torch.float64  # type: ignore[misc]


def test_layout_records_dtype() -> None:
    assert FlatLayout.from_module(mlp().double()).dtype == torch.float64
    assert FlatLayout.from_module(nn.ReLU()).numel == 0


def test_flatten_reports_every_problem_at_once() -> None:
    layout = FlatLayout.from_module(mlp())
    tensors = {n: torch.zeros(e.shape) for n, e in zip(layout.names, layout, strict=True)}
    del tensors["0.bias"]
    tensors["2.weight"] = torch.zeros(7, 3)
    tensors["extra"] = torch.zeros(1)
    message = (
        "tensors do not match the layout: missing '0.bias'; '2.weight' has shape (7, 3), "
        "expected (3, 7); unexpected 'extra'"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        layout.flatten(tensors)


def test_unflatten_checks_its_input() -> None:
    layout = FlatLayout.from_module(mlp())
    with pytest.raises(
        TypeError, match=re.escape("flat must be a torch.Tensor of shape (..., 66), got list")
    ):
        layout.unflatten([0.0] * 66)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=re.escape(
            "flat has shape (65,) but this layout needs 66 elements in its last dimension"
        ),
    ):
        layout.unflatten(torch.zeros(65))
    with pytest.raises(KeyError, match="'nope' is not in this layout"):
        layout["nope"]


def test_entries_must_be_contiguous() -> None:
    with pytest.raises(ValueError, match=re.escape("layout entry 'b' starts at offset 5")):
        FlatLayout((LayoutEntry("a", (2,), 0), LayoutEntry("b", (2,), 5)), torch.float32)
    with pytest.raises(ValueError, match="layout names must be unique; 'a' appears twice"):
        FlatLayout((LayoutEntry("a", (2,), 0), LayoutEntry("a", (2,), 2)), torch.float32)


def test_include_selects_parameters() -> None:
    net = mlp()
    net[0].weight.requires_grad_(False)
    assert FlatLayout.from_module(net, include="trainable").names == (
        "0.bias",
        "2.weight",
        "2.bias",
    )
    only_bias = FlatLayout.from_module(net, include=lambda name, p: name.endswith("bias"))
    assert only_bias.names == ("0.bias", "2.bias")
    with pytest.raises(TypeError, match="include must be None, 'all', 'trainable' or a callable"):
        FlatLayout.from_module(net, include="frozen")  # type: ignore[arg-type]
