"""Loading state dicts and checkpoint files where plain torch has its own rules: models built on
the meta device, ``assign=True`` (which keeps the state dict's tensors, dtype included), tied
weights, prefixes and submodules; and files whose metadata is inconsistent or hostile. Every
result is compared with the unwrapped twin (a deepcopy taken before wrapping) loaded the same
way by plain torch."""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODELS, Tied, assert_same_state, build, mlp, snapshot, unchanged
from torch import Tensor, nn

from torchreparam import (
    ReparamModule,
    StateDictMismatchError,
    layout_from_json,
    load_checkpoint,
    load_flat,
    save_checkpoint,
)

NAMES = ["mlp", "convbn", "tied"]


# ---- helpers ----------------------------------------------------------------------------------
def _source(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, tuple[Any, ...]]:
    """A trained-looking model of ``name`` (BatchNorm statistics moved) and its inputs."""
    factory, inputs = MODELS[name]
    torch.manual_seed(7)
    src = factory()
    args = inputs()
    src.train()
    with torch.no_grad():
        src(*args)
    src.eval()
    src = src.to(dtype)
    return src, tuple(a.to(dtype) if a.is_floating_point() else a for a in args)


def _meta_pair(name: str) -> tuple[ReparamModule, nn.Module]:
    """A wrapper of a model built on the meta device, and its (meta) twin."""
    factory, _ = MODELS[name]
    with torch.device("meta"):
        net = factory()
    twin = copy.deepcopy(net)
    return ReparamModule(net), twin


def _wrapper_format(src: nn.Module) -> dict[str, Tensor]:
    return ReparamModule(copy.deepcopy(src)).state_dict()


def _assert_single_storage(r: ReparamModule) -> None:
    """Every managed parameter is a view of flat_param (one storage), with its values."""
    flat = r.flat_param
    views = dict(r.module.named_parameters())
    for entry in r.layout:
        view = views[entry.name]
        assert view.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr(), entry.name
        assert view.dtype == flat.dtype, entry.name
        assert view.device == flat.device, entry.name
        assert torch.equal(view.detach(), flat.detach()[entry.slice].view(entry.shape)), entry.name


def _assert_like_twin(r: ReparamModule, twin: nn.Module, args: tuple[Any, ...]) -> None:
    """``r`` holds the twin's values, calls as the twin does, and a call with another vector
    matches ``functional_call`` on the twin."""
    r.eval()
    twin.eval()
    _assert_single_storage(r)
    assert r.layout.dtype == r.flat_param.dtype
    twin_params = dict(twin.named_parameters())
    for entry in r.layout:
        assert twin_params[entry.name].dtype == r.flat_param.dtype, entry.name
        assert torch.equal(r.flat_param.detach()[entry.slice], twin_params[entry.name].reshape(-1))
    assert_same_state(snapshot(twin), snapshot(r.module))
    with torch.no_grad():
        assert torch.equal(r(*args), twin(*args))
        assert torch.equal(r.module(*args), twin(*args))
        theta = torch.randn(r.param_numel, dtype=r.flat_param.dtype)
        views = r.layout.unflatten(theta, aliases=True)  # (assign=True unties the twin's)
        assert torch.equal(
            r(*args, flat_param=theta), torch.func.functional_call(twin, views, args)
        )


# ---- 2a: a model built on the meta device ------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_a_meta_model_loads_a_module_state_dict_with_assign(name: str) -> None:
    src, args = _source(name)
    r, twin = _meta_pair(name)
    twin.load_state_dict(src.state_dict(), assign=True)
    r.load_state_dict(src.state_dict(), assign=True)
    assert r.flat_param.device.type == "cpu"
    assert r.flat_param.requires_grad
    _assert_like_twin(r, twin, args)


@pytest.mark.parametrize("name", NAMES)
def test_a_meta_model_loads_a_wrapper_state_dict_with_assign(name: str) -> None:
    src, args = _source(name)
    r, twin = _meta_pair(name)
    twin.load_state_dict(src.state_dict(), assign=True)
    r.load_state_dict(_wrapper_format(src), assign=True)
    _assert_like_twin(r, twin, args)


@pytest.mark.parametrize("materialize", ["r.to_empty", "net.to_empty"])
@pytest.mark.parametrize("load", ["r, module format", "r, wrapper format", "net"])
def test_a_materialized_meta_model_loads_with_assign(materialize: str, load: str) -> None:
    src, args = _source("convbn")
    r, twin = _meta_pair("convbn")
    (r if materialize == "r.to_empty" else r.module).to_empty(device="cpu")
    twin.to_empty(device="cpu")
    twin.load_state_dict(src.state_dict(), assign=True)
    if load == "net":
        r.module.load_state_dict(src.state_dict(), assign=True)
    else:
        given = src.state_dict() if load == "r, module format" else _wrapper_format(src)
        r.load_state_dict(given, assign=True)
    _assert_like_twin(r, twin, args)


def test_a_meta_model_without_assign_stays_on_meta_as_plain_torch() -> None:
    """A copy into a meta parameter is a no-op in torch (which warns): the same here."""
    src, _ = _source("mlp")
    r, twin = _meta_pair("mlp")
    with pytest.warns(UserWarning, match="meta parameter"):
        twin.load_state_dict(src.state_dict())
    with pytest.warns(UserWarning, match="meta parameter"):
        r.load_state_dict(src.state_dict())
    assert r.flat_param.is_meta
    assert all(p.is_meta for p in twin.parameters())


@pytest.mark.parametrize("into", ["r", "net"])
def test_a_meta_model_needs_every_parameter_and_nothing_changes(into: str) -> None:
    src, _ = _source("mlp")
    r, _ = _meta_pair("mlp")
    partial = src.state_dict()
    del partial["0.bias"]
    flat = r.flat_param
    need = "every parameter must be given" if into == "r" else "assign=True needs every parameter (with data, of its shape)"  # fmt: skip
    message = (
        "cannot load the state dict (nothing was changed): flat_param is on the meta device "
        f"(no data), so {need}; missing ['0.bias'] (or materialize the module first: "
        "r.to_empty(device=...))"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        (r if into == "r" else r.module).load_state_dict(partial, strict=False, assign=True)
    assert r.flat_param is flat
    assert flat.is_meta


def test_load_checkpoint_into_a_meta_model(tmp_path: Path) -> None:
    src, args = _source("convbn")
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, ReparamModule(copy.deepcopy(src)))
    r, twin = _meta_pair("convbn")
    twin.load_state_dict(src.state_dict(), assign=True)
    load_checkpoint(path, r)
    _assert_like_twin(r, twin, args)


@pytest.mark.parametrize("name", ["convbn", "tied"])
def test_the_unwrapped_meta_module_loads_with_assign(name: str) -> None:
    src, args = _source(name)
    r, twin = _meta_pair(name)
    twin.load_state_dict(src.state_dict(), assign=True)
    r.module.load_state_dict(src.state_dict(), assign=True)
    _assert_like_twin(r, twin, args)


def test_a_meta_tensor_in_the_state_dict_of_a_real_model_is_refused() -> None:
    r, _, (x,) = build("mlp")
    given = _source("mlp")[0].state_dict()
    given["0.weight"] = torch.empty(7, 5, device="meta")
    message = (
        "cannot load the state dict (nothing was changed): "
        "0.weight: a meta tensor (no data) in the state dict"
    )
    with unchanged(r, x), pytest.raises(StateDictMismatchError, match=re.escape(message)):
        r.load_state_dict(given, assign=True)


# ---- 2b: assign=True with another dtype: flat_param follows, as a plain module's parameters ---
@pytest.mark.parametrize("fmt", ["module", "wrapper"])
@pytest.mark.parametrize("name", NAMES)
def test_assign_keeps_the_state_dicts_dtype_and_the_layout_follows(
    name: str, fmt: str, tmp_path: Path
) -> None:
    src, args = _source(name, torch.float64)
    r, twin, _ = build(name)
    given = src.state_dict() if fmt == "module" else _wrapper_format(src)
    twin.load_state_dict(src.state_dict(), assign=True)
    r.load_state_dict(given, assign=True)
    assert r.flat_param.dtype == r.layout.dtype == torch.float64
    _assert_like_twin(r, twin, args)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, r)  # raised before: the layout's dtype was left behind
    other, _, _ = build(name, torch.float64)
    load_checkpoint(path, other)
    assert torch.equal(other.flat_param, r.flat_param)


@pytest.mark.parametrize("fmt", ["module", "wrapper"])
def test_without_assign_another_dtype_is_converted_as_plain_torch(fmt: str) -> None:
    src, args = _source("convbn", torch.float64)
    r, twin, _ = build("convbn")
    twin.load_state_dict(src.state_dict())
    r.load_state_dict(src.state_dict() if fmt == "module" else _wrapper_format(src))
    assert r.flat_param.dtype == r.layout.dtype == torch.float32
    _assert_like_twin(r, twin, tuple(a.float() for a in args))


def test_assign_with_parameters_of_mixed_dtypes_keeps_flat_params_dtype() -> None:
    """One vector holds one dtype: values of several dtypes are converted to flat_param's."""
    src, args = _source("mlp")
    given = src.state_dict()
    given["0.weight"] = given["0.weight"].double()
    r, _, _ = build("mlp")
    r.load_state_dict(given, assign=True)
    assert r.flat_param.dtype == r.layout.dtype == torch.float32
    _assert_single_storage(r)
    with torch.no_grad():
        assert torch.equal(r(*args), src(*args))


def test_the_unwrapped_modules_assign_converts_to_flat_params_dtype(tmp_path: Path) -> None:
    """The unwrapped module loads submodule by submodule into the one vector: values of another
    dtype are converted (plain torch would keep them; the vector cannot change mid-load)."""
    src, args = _source("mlp", torch.float64)
    r, _, _ = build("mlp")
    r.module.load_state_dict(src.state_dict(), assign=True)
    assert r.flat_param.dtype == r.layout.dtype == torch.float32
    _assert_single_storage(r)
    torch.testing.assert_close(r(*(a.float() for a in args)), src(*args).float())
    save_checkpoint(tmp_path / "ckpt.safetensors", r)


def test_a_failed_assign_puts_back_flat_param_and_the_layouts_dtype(tmp_path: Path) -> None:
    r, _, (x,) = build("convbn")
    src, _ = _source("convbn", torch.float64)

    def fail(module: nn.Module, keys: Any) -> None:
        raise RuntimeError("hook failed")

    handle = r.module[4].register_load_state_dict_post_hook(fail)
    with unchanged(r, x), pytest.raises(RuntimeError, match="hook failed"):
        r.load_state_dict(_wrapper_format(src), assign=True)
    handle.remove()
    assert r.layout.dtype == r.flat_param.dtype == torch.float32
    save_checkpoint(tmp_path / "ckpt.safetensors", r)


def test_assign_inside_a_bigger_model_follows_the_dtype(tmp_path: Path) -> None:
    src, args = _source("mlp", torch.float64)
    r, _, _ = build("mlp")
    big = nn.Sequential(OrderedDict(body=r, head=nn.Linear(3, 2)))
    twin = nn.Sequential(OrderedDict(body=ReparamModule(copy.deepcopy(src)), head=nn.Linear(3, 2)))
    twin.double()
    big.load_state_dict(twin.state_dict(), assign=True)
    assert r.flat_param.dtype == r.layout.dtype == torch.float64
    assert torch.equal(big(*args), twin(*args))
    save_checkpoint(tmp_path / "ckpt.safetensors", r)


# ---- siblings: tied weights, submodules, strict=False ----------------------------------------
def test_tied_weights_stay_tied_under_assign() -> None:
    """Plain torch's assign=True unties them (two Parameters); the wrapper keeps one entry."""
    src, args = _source("tied")
    r, twin, _ = build("tied")
    r.load_state_dict(src.state_dict(), assign=True)
    twin.load_state_dict(src.state_dict())
    _assert_like_twin(r, twin, args)
    assert r.module.out.weight.data_ptr() == r.module.emb.weight.data_ptr()


def test_tied_weights_given_different_values_are_refused() -> None:
    r, _, (x,) = build("tied")
    given = Tied().state_dict()
    given["out.weight"] = given["out.weight"] + 1
    message = (
        "cannot load the state dict (nothing was changed): emb.weight, out.weight: tied in the "
        "module (one parameter) but not equal in the state dict; give them equal values, or "
        "only one of the names"
    )
    for assign in (False, True):
        with unchanged(r, x), pytest.raises(StateDictMismatchError, match=re.escape(message)):
            r.load_state_dict(given, assign=assign)


@pytest.mark.parametrize("assign", [False, True])
def test_a_submodule_of_the_unwrapped_module_loads_as_plain_torch(assign: bool) -> None:
    r, twin, (x,) = build("convbn")
    other = nn.Linear(4 * 5 * 5, 3)
    r.module[4].load_state_dict(other.state_dict(), assign=assign)
    twin[4].load_state_dict(other.state_dict(), assign=assign)
    _assert_like_twin(r, twin, (x,))


@pytest.mark.parametrize("assign", [False, True])
def test_a_partial_state_dict_with_strict_false(assign: bool) -> None:
    src, args = _source("convbn")
    r, twin, _ = build("convbn")
    partial = {k: v for k, v in src.state_dict().items() if k.startswith("4.")}
    r.load_state_dict(partial, strict=False, assign=assign)
    twin.load_state_dict(partial, strict=False, assign=assign)
    _assert_like_twin(r, twin, args)


@pytest.mark.parametrize(("name", "kept"), [("convbn", "4."), ("tied", "emb."), ("tied", "out.")])
def test_a_partial_state_dict_reports_the_keys_as_plain_torch(name: str, kept: str) -> None:
    src, _ = _source(name)
    r, twin, _ = build(name)
    partial = {k: v for k, v in src.state_dict().items() if k.startswith(kept)}
    partial["extra"] = torch.ones(1)
    expected = twin.load_state_dict(partial, strict=False)
    assert r.load_state_dict(partial, strict=False) == expected
    assert r.module.load_state_dict(partial, strict=False) == expected


# ---- 2c and 2d: inconsistent or hostile checkpoint files -------------------------------------
def test_a_file_whose_layout_calls_a_stored_tensor_an_alias_is_refused(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file

    r, _, (x,) = build("tied")
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_checkpoint(good, r)
    with safetensors.safe_open(str(good), framework="pt") as file:
        metadata = file.metadata()
    tensors = load_file(good)
    assert "out.weight" not in tensors  # stored once, under its first name
    tensors["out.weight"] = torch.zeros_like(tensors["emb.weight"])
    save_file(tensors, bad, metadata=metadata)
    message = (
        f"{bad} is inconsistent (nothing was loaded): 'out.weight' is declared an alias of "
        "'emb.weight', yet the file holds a tensor 'out.weight' besides 'emb.weight'."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_flat(bad)
    with unchanged(r, x), pytest.raises(ValueError, match=re.escape(message)):
        load_checkpoint(bad, r)


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000, '{"a":' * 100_000, '{"version":' + "[" * 100_000],
    ids=["lists", "objects", "a value"],
)
def test_deeply_nested_layout_json_is_a_value_error(text: str) -> None:
    message = (
        "not a torchreparam layout JSON: nested too deeply to read (a layout's JSON nests 4 "
        "levels); the text is corrupt or not a layout"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        layout_from_json(text)


def test_a_huge_or_nested_value_is_shown_cut_short() -> None:
    nested = '{"version":' + "[" * 500 + "]" * 500 + "}"
    with pytest.raises(
        ValueError, match=re.escape("version [[[[[[[...]]]]]]]: expected an integer")
    ):
        layout_from_json(nested)
    with pytest.raises(ValueError, match=r"unknown dtype 'x+\.\.\.x+'$"):
        layout_from_json('{"version":1,"dtype":"' + "x" * 10_000 + '"}')
    entry = '{"name":"' + "n" * 10_000 + '","shape":[1],"offset":%d,"aliases":[]}'
    twice = f'{{"version":1,"dtype":"float32","numel":2,"entries":[{entry % 0},{entry % 1}]}}'
    with pytest.raises(ValueError, match="appears twice") as info:
        layout_from_json(twice)
    assert len(str(info.value)) < 600


def test_a_file_with_a_deeply_nested_layout_is_a_value_error(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file

    r, _, (x,) = build("mlp")
    good, bad = tmp_path / "good.safetensors", tmp_path / "bad.safetensors"
    save_checkpoint(good, r)
    with safetensors.safe_open(str(good), framework="pt") as file:
        metadata = {**file.metadata(), "torchreparam.layout": "[" * 100_000}
    save_file(load_file(good), bad, metadata=metadata)
    message = (
        f"{bad}: the layout in its metadata ('torchreparam.layout') cannot be read: not a "
        "torchreparam layout JSON: nested too deeply to read"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_flat(bad)
    with unchanged(r, x), pytest.raises(ValueError, match=re.escape(message)):
        load_checkpoint(bad, r)


def test_unwrapped_keys_that_start_with_module_are_not_the_wrappers() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.module(x)

    r, other = ReparamModule(Holder()), Holder()
    r.load_state_dict(other.state_dict())  # keys "module.weight", "module.bias"
    assert torch.equal(r(torch.ones(1, 2)), other(torch.ones(1, 2)))


def test_a_failed_load_does_not_leave_the_module_lenient() -> None:
    r, _, _ = build("mlp")

    def fail(*_: object) -> None:
        raise KeyError("hook")

    handle = r.module[2].register_load_state_dict_post_hook(fail)
    with pytest.raises(KeyError):
        r.load_state_dict(r.state_dict())
    handle.remove()
    partial = mlp().state_dict()
    del partial["0.weight"]
    with pytest.raises(RuntimeError, match=re.escape('Missing key(s) in state_dict: "0.weight"')):
        r.module.load_state_dict(partial)
