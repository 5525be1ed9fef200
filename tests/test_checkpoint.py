"""Checkpoint files: exact round trips, plain safetensors state dicts, one error listing every
difference (and nothing changed), trajectories as one tensor."""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import Tied, assert_same_state, build, convbn, mlp, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from torchreparam import FlatLayout, LayoutEntry, ReparamModule, StateDictMismatchError

safetensors_torch = pytest.importorskip("safetensors.torch")

from torchreparam import _files  # noqa: E402
from torchreparam._checkpoint import (  # noqa: E402
    from_state_dict,
    load_checkpoint,
    load_flat,
    save_checkpoint,
    save_flat,
    to_module_state_dict,
    to_wrapper_state_dict,
)
from torchreparam._files import layout_from_json, layout_to_json  # noqa: E402
from torchreparam._trajectory import load_trajectory, save_trajectory  # noqa: E402

NAMES = ["mlp", "convbn", "tied"]


def perturbed(r: ReparamModule) -> ReparamModule:
    """A copy of ``r`` with other weights and buffers."""
    other = copy.deepcopy(r)
    with torch.no_grad():
        other.flat_param.add_(1.0)
        for b in other.module.buffers():
            b.add_(3)
    return other


# ---- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip_is_exact(name: str, tmp_path: Path) -> None:
    r, _, args = build(name)
    r.train()
    with torch.no_grad():
        r(*args)  # moves BatchNorm's running statistics away from their defaults
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, r, metadata={"epoch": "7"})
    other = perturbed(r)
    flat_before = other.flat_param
    assert load_checkpoint(path, other) == {"epoch": "7"}
    assert other.flat_param is flat_before  # loaded in place
    assert_same_state(snapshot(r), snapshot(other))
    assert_same_state(snapshot(r.module), snapshot(other.module))
    r.eval(), other.eval()
    assert torch.equal(r(*args), other(*args))


@pytest.mark.parametrize("name", NAMES)
def test_the_file_is_a_plain_state_dict(name: str, tmp_path: Path) -> None:
    r, twin, args = build(name)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, r)
    plain = safetensors_torch.load_file(str(path))
    fresh = copy.deepcopy(twin)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    result = fresh.load_state_dict(plain, strict=False)
    aliases = {a for entry in r.layout for a in entry.aliases}
    assert set(result.missing_keys) == aliases  # tied weights are stored once
    assert result.unexpected_keys == []
    fresh.eval(), twin.eval()
    assert torch.equal(fresh(*args), twin(*args))
    assert set(plain) == set(r.layout.names) | {n for n, _ in twin.named_buffers()}
    assert all(t.is_contiguous() for t in plain.values())


def test_frozen_parameters_outside_the_vector_are_saved_by_name(tmp_path: Path) -> None:
    net = mlp()
    net.get_submodule("0").requires_grad_(False)
    r = ReparamModule(net, include="trainable")
    save_checkpoint(tmp_path / "c.safetensors", r)
    assert set(safetensors_torch.load_file(str(tmp_path / "c.safetensors"))) == {
        "0.weight",
        "0.bias",
        "2.weight",
        "2.bias",
    }
    other = perturbed(r)
    with torch.no_grad():
        other.module.get_parameter("0.weight").add_(1.0)
    load_checkpoint(tmp_path / "c.safetensors", other)
    assert_same_state(snapshot(r.module), snapshot(other.module))


def test_save_flat_and_load_flat_with_buffers_and_metadata(tmp_path: Path) -> None:
    net = convbn().double()
    layout = FlatLayout.from_module(net)
    flat = torch.randn(layout.numel, dtype=torch.float64)
    buffers = dict(net.named_buffers())
    path = tmp_path / "flat.safetensors"
    save_flat(path, flat, layout, buffers=buffers, metadata={"note": 'ünïcode, "quoted"'})
    loaded = load_flat(path)
    assert torch.equal(loaded.flat, flat)
    assert loaded.flat.dtype == torch.float64
    assert loaded.layout == layout
    assert loaded.metadata == {"note": 'ünïcode, "quoted"'}
    assert set(loaded.buffers) == set(buffers)
    for key, value in buffers.items():
        assert torch.equal(loaded.buffers[key], value)
        assert loaded.buffers[key].dtype == value.dtype
    flat2, layout2, _, _ = load_flat(path, layout=layout)
    assert torch.equal(flat2, flat)
    assert layout2 is layout


def test_non_contiguous_and_grad_requiring_vectors_are_saved(tmp_path: Path) -> None:
    layout = FlatLayout.from_module(mlp())
    population = torch.randn(layout.numel, 3, requires_grad=True)
    column = population[:, 1]  # stride 3, part of a larger storage, in a graph
    save_flat(tmp_path / "f.safetensors", column, layout)
    assert torch.equal(load_flat(tmp_path / "f.safetensors").flat, column.detach())


def test_a_plain_state_dict_file_loads_with_an_expected_layout(tmp_path: Path) -> None:
    r, twin, args = build("convbn")
    path = tmp_path / "plain.safetensors"
    safetensors_torch.save_file(perturbed_module_state(twin), str(path))
    with pytest.raises(ValueError, match=re.escape("has no torchreparam layout in its metadata")):
        load_flat(path)
    flat, layout, buffers, metadata = load_flat(path, layout=r.layout)
    assert layout is r.layout
    assert metadata == {}
    assert sorted(buffers) == ["1.num_batches_tracked", "1.running_mean", "1.running_var"]
    load_checkpoint(path, r)
    assert torch.equal(r.flat_param, flat)
    twin.load_state_dict(safetensors_torch.load_file(str(path)))
    r.eval(), twin.eval()
    assert torch.equal(r(*args), twin(*args))


def perturbed_module_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v + 1 if v.is_floating_point() else v + 2) for k, v in net.state_dict().items()}


# ---- conversions ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_conversions_between_state_dicts(name: str) -> None:
    r, twin, args = build(name)
    flat = r.flat_param.detach() + 0.5
    rest = {k: v + 1 for k, v in twin.state_dict().items() if k not in r.layout}
    module_sd = to_module_state_dict(flat, r.layout, buffers=rest)
    assert set(module_sd) == set(twin.state_dict())
    twin.load_state_dict(module_sd)  # strict: every key, aliases included
    wrapper_sd = to_wrapper_state_dict(flat, r.layout, buffers=rest)
    assert set(wrapper_sd) == set(r.state_dict())
    r.load_state_dict(wrapper_sd)
    r.eval(), twin.eval()
    assert torch.equal(r(*args), twin(*args))
    for state in (module_sd, wrapper_sd, r.state_dict(), twin.state_dict()):
        back, back_rest = from_state_dict(state, r.layout)
        assert torch.equal(back, flat)
        assert set(back_rest) == set(rest)
        assert all(torch.equal(back_rest[k], v) for k, v in rest.items())


def test_from_state_dict_lists_every_problem() -> None:
    layout = FlatLayout.from_module(mlp())
    state = dict(mlp().state_dict())
    state["0.weight"] = state["0.weight"].double()
    state["2.bias"] = torch.zeros(4)
    del state["0.bias"]
    message = (
        "the state dict does not match (nothing was loaded): Missing key(s): '0.bias'; "
        "0.weight: dtype torch.float64, expected torch.float32; "
        "2.bias: shape (4,), expected (3,)"
    )
    with pytest.raises(StateDictMismatchError, match=re.escape(message)):
        from_state_dict(state, layout)
    message = (
        "the state dict does not match (nothing was loaded): Unexpected key(s): 'x'; "
        "flat_param: shape (3,), expected (66,)"
    )
    with pytest.raises(StateDictMismatchError, match=re.escape(message)):
        from_state_dict({"flat_param": torch.zeros(3), "x": torch.zeros(1)}, layout)


# ---- mismatches: one error, nothing changed ------------------------------------------------
class Other(nn.Module):
    """Differs from convbn in every way: a missing, an unexpected, a reshaped parameter and a
    buffer of another dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("0", nn.Conv2d(3, 5, 3, padding=1))  # shapes differ
        self.add_module("1", nn.BatchNorm2d(5))
        self.add_module("4", nn.Linear(4 * 5 * 5, 3, bias=False))  # 4.bias is missing here
        self.extra = nn.Parameter(torch.zeros(2))  # not in the file
        self.register_buffer("scale", torch.ones(1))  # a buffer the file does not have


def test_a_different_model_gets_one_error_listing_everything_and_nothing_changes(
    tmp_path: Path,
) -> None:
    source, _, _ = build("convbn")
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, source)
    target = ReparamModule(Other())
    state, inner = snapshot(target), snapshot(target.module)
    flat = target.flat_param
    with pytest.raises(StateDictMismatchError) as info:
        load_checkpoint(path, target)
    message = str(info.value)
    expected = (
        "the file does not match (nothing was loaded): Missing key(s): 'extra', 'scale'; "
        "Unexpected key(s): '4.bias'; "
        "0.bias: shape (4,), expected (5,); "
        "0.weight: shape (4, 3, 3, 3), expected (5, 3, 3, 3); "
        "1.bias: shape (4,), expected (5,); "
        "1.running_mean: shape (4,), expected (5,); "
        "1.running_var: shape (4,), expected (5,); "
        "1.weight: shape (4,), expected (5,)"
    )
    assert message == expected
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, RuntimeError)
    assert target.flat_param is flat
    assert_same_state(state, snapshot(target))
    assert_same_state(inner, snapshot(target.module))


def test_a_dtype_mismatch_is_reported_and_nothing_changes(tmp_path: Path) -> None:
    source, _, _ = build("convbn", torch.float64)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, source)
    target, _, _ = build("convbn")
    state = snapshot(target)
    with pytest.raises(StateDictMismatchError) as info:
        load_checkpoint(path, target)
    assert "0.weight: dtype torch.float64, expected torch.float32" in str(info.value)
    assert "1.running_mean: dtype torch.float64, expected torch.float32" in str(info.value)
    assert_same_state(state, snapshot(target))
    with pytest.raises(StateDictMismatchError, match=re.escape("torch.float64, expected torch")):
        load_flat(path, layout=target.layout)


def test_load_flat_against_a_different_layout(tmp_path: Path) -> None:
    layout = FlatLayout.from_module(mlp())
    path = tmp_path / "f.safetensors"
    save_flat(path, torch.randn(layout.numel), layout)
    wider = FlatLayout.from_module(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)))
    message = (
        "Missing key(s): 'extra'; 0.bias: shape (7,), expected (8,); "
        "0.weight: shape (7, 5), expected (8, 5); 2.weight: shape (3, 7), expected (3, 8)"
    )
    entries = (*wider.entries, LayoutEntry("extra", (1,), wider.numel))
    with pytest.raises(StateDictMismatchError, match=re.escape(message)):
        load_flat(path, layout=FlatLayout(entries, torch.float32))
    fewer = FlatLayout(layout.entries[:2], torch.float32)
    with pytest.raises(
        StateDictMismatchError, match=re.escape("Unexpected key(s): '2.bias', '2.weight'")
    ):
        load_flat(path, layout=fewer)


def test_tied_weights_that_differ_in_a_plain_file_are_refused(tmp_path: Path) -> None:
    r, twin, _ = build("tied")
    state = {k: v.clone() for k, v in twin.state_dict().items()}
    state["out.weight"] += 1
    path = tmp_path / "untied.safetensors"
    safetensors_torch.save_file(state, str(path))
    before = snapshot(r)
    message = "emb.weight, out.weight: tied in the layout but not equal"
    with pytest.raises(StateDictMismatchError, match=re.escape(message)):
        load_checkpoint(path, r)
    assert_same_state(before, snapshot(r))


def test_a_tied_file_loads_into_an_untied_model(tmp_path: Path) -> None:
    r, _, _ = build("tied")
    path = tmp_path / "tied.safetensors"
    save_checkpoint(path, r)
    untied = Tied()
    untied.out.weight = nn.Parameter(untied.emb.weight.detach().clone())
    target = ReparamModule(untied)
    load_checkpoint(path, target)
    views = target.layout.unflatten(target.flat_param)
    assert torch.equal(views["out.weight"], views["emb.weight"])
    assert torch.equal(views["emb.weight"], r.layout.view(r.flat_param, "emb.weight"))


# ---- trajectories --------------------------------------------------------------------------
def test_trajectory_round_trip(tmp_path: Path) -> None:
    layout = FlatLayout.from_module(Tied())
    flats = [torch.randn(layout.numel) for _ in range(50)]
    path = tmp_path / "expert_0.safetensors"
    save_trajectory(path, flats, layout, steps=range(0, 100, 2), metadata={"lr": "0.01"})
    traj, loaded_layout, steps, metadata = load_trajectory(path)
    assert traj.shape == (50, layout.numel)
    assert torch.equal(traj, torch.stack(flats))
    assert loaded_layout == layout
    assert metadata == {"lr": "0.01"}
    assert steps is not None
    assert steps.dtype == torch.int64
    assert steps.tolist() == list(range(0, 100, 2))
    save_trajectory(path, torch.stack(flats), layout)  # a (T, N) tensor: same file, no steps
    again = load_trajectory(path, layout=layout)
    assert torch.equal(again.flats, traj)
    assert again.steps is None


def test_trajectory_columns_follow_the_expected_layout(tmp_path: Path) -> None:
    layout = FlatLayout.from_module(mlp())
    flats = torch.randn(4, layout.numel)
    save_trajectory(tmp_path / "t.safetensors", flats, layout)
    reordered = FlatLayout.from_named_tensors(
        {e.name: torch.empty(e.shape) for e in reversed(layout.entries)}
    )
    traj = load_trajectory(tmp_path / "t.safetensors", layout=reordered).flats
    for name in layout.names:
        assert torch.equal(reordered.view(traj, name), layout.view(flats, name))
    bigger = FlatLayout.from_module(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)))
    with pytest.raises(
        StateDictMismatchError, match=re.escape("0.bias: shape (7,), expected (8,)")
    ):
        load_trajectory(tmp_path / "t.safetensors", layout=bigger)


def test_a_long_trajectory_is_fast(tmp_path: Path) -> None:
    layout = FlatLayout((LayoutEntry("w", (100, 1000), 0),), torch.float32)
    flats = [torch.randn(layout.numel) for _ in range(200)]
    start = time.perf_counter()
    save_trajectory(tmp_path / "long.safetensors", flats, layout)
    traj = load_trajectory(tmp_path / "long.safetensors", layout=layout).flats
    assert torch.equal(traj[123], flats[123])
    assert time.perf_counter() - start < 10  # vectorized: about 1 s here, mostly disk


def test_files_of_one_kind_are_refused_by_the_other_reader(tmp_path: Path) -> None:
    layout = FlatLayout.from_module(mlp())
    save_flat(tmp_path / "flat.safetensors", torch.zeros(layout.numel), layout)
    save_trajectory(tmp_path / "traj.safetensors", torch.zeros(2, layout.numel), layout)
    message = "holds one flat vector, not a weight trajectory; read it with load_flat"
    with pytest.raises(ValueError, match=message):
        load_trajectory(tmp_path / "flat.safetensors")
    message = "holds a weight trajectory, not one flat vector; read it with load_trajectory"
    with pytest.raises(ValueError, match=message):
        load_flat(tmp_path / "traj.safetensors")
    r = ReparamModule(mlp())
    with pytest.raises(ValueError, match="read it with load_trajectory"):
        load_checkpoint(tmp_path / "traj.safetensors", r)
    safetensors_torch.save_file({"w": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="is not a weight trajectory"):
        load_trajectory(tmp_path / "plain.safetensors", layout=layout)


# ---- bad arguments -------------------------------------------------------------------------
def test_bad_arguments_raise_before_anything_is_written(tmp_path: Path) -> None:
    layout = FlatLayout.from_module(mlp())
    path = tmp_path / "never.safetensors"
    flat = torch.zeros(layout.numel)
    cases: list[tuple[type[Exception], str, dict[str, object]]] = [
        (ValueError, "flat: shape (65,), expected (66,)", {"flat": torch.zeros(65)}),
        (TypeError, "flat: dtype torch.float64, expected torch.float32", {"flat": flat.double()}),
        (TypeError, "flat: a list, expected a tensor", {"flat": [0.0] * 66}),
        (TypeError, "layout must be a FlatLayout", {"layout": "mlp"}),
        (TypeError, "buffers must hold tensors; ['b'] do not", {"buffers": {"b": 1.0}}),
        (
            ValueError,
            "buffers ['0.bias'] have the names of parameters",
            {"buffers": {"0.bias": flat}},
        ),
        (TypeError, "metadata must map str -> str, but 'epoch' do not", {"metadata": {"epoch": 3}}),
        (ValueError, "metadata keys ['format'] are reserved", {"metadata": {"format": "np"}}),
    ]
    for error, message, change in cases:
        kwargs: dict[str, object] = {"flat": flat, "layout": layout, **change}
        with pytest.raises(error, match=re.escape(message)):
            save_flat(path, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=re.escape("r must be a ReparamModule, got Sequential")):
        save_checkpoint(path, mlp())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape("flats[1]: shape (3,), expected (66,)")):
        save_trajectory(path, [flat, torch.zeros(3)], layout)
    with pytest.raises(ValueError, match=re.escape("flats: shape (66,), expected (steps, 66)")):
        save_trajectory(path, flat, layout)
    with pytest.raises(TypeError, match="non-empty sequence"):
        save_trajectory(path, [], layout)
    with pytest.raises(ValueError, match=re.escape("steps has shape (3,); expected (2,)")):
        save_trajectory(path, [flat, flat], layout, steps=[0, 1, 2])
    with pytest.raises(TypeError, match="steps must be integers"):
        save_trajectory(path, [flat, flat], layout, steps=[0.5, 1.0])  # type: ignore[list-item]
    assert list(tmp_path.iterdir()) == []


def test_a_missing_safetensors_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = ReparamModule(mlp())
    layout, flat = r.layout, r.flat_param.detach()
    path = tmp_path / "f.safetensors"
    save_flat(path, flat, layout)
    before = path.read_bytes()
    monkeypatch.setattr(_files, "_SAFETENSORS_ERROR", ImportError("No module named 'x'"))
    calls = [  # every function that reads or writes a file
        lambda: save_flat(path, flat, layout),
        lambda: load_flat(path),
        lambda: save_checkpoint(path, r),
        lambda: load_checkpoint(path, r),
        lambda: save_trajectory(path, [flat], layout),
        lambda: load_trajectory(path),
    ]
    for call in calls:
        with pytest.raises(ImportError, match=re.escape("pip install safetensors")) as info:
            call()
        assert "torchreparam[checkpoint]" in str(info.value)
        assert isinstance(info.value.__cause__, ImportError)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]


def test_layout_json_round_trips_and_refuses_garbage() -> None:
    layout = FlatLayout.from_module(Tied().to(torch.bfloat16))
    assert layout_from_json(layout_to_json(layout)) == layout
    assert layout_from_json(layout_to_json(layout)).entries[0].aliases == ("out.weight",)
    good = layout_to_json(layout)
    for bad, why in [
        ("[]", "list indices"),
        ("{", "Expecting"),
        (
            good.replace('"version":1', '"version":2'),
            "version 2, and this torchreparam reads version 1",
        ),
        (good.replace('"bfloat16"', '"float99"'), "float99"),
        (good.replace('"numel":', '"numel":1'), "but the entries hold"),
        (good.replace('"offset":60', '"offset":61'), "entries must be contiguous"),
        (good.replace('"shape":[6]', '"shape":[-6]'), "non-negative integers"),
    ]:
        with pytest.raises(ValueError, match="not a torchreparam layout JSON") as info:
            layout_from_json(bad)
        assert why in str(info.value), (why, str(info.value))


def test_scalar_parameters_round_trip(tmp_path: Path) -> None:
    layout = FlatLayout((LayoutEntry("scale", (), 0), LayoutEntry("w", (2,), 1)), torch.float32)
    flat = torch.randn(3)
    save_flat(tmp_path / "s.safetensors", flat, layout)
    assert torch.equal(load_flat(tmp_path / "s.safetensors").flat, flat)


# ---- property: any layout round-trips exactly ---------------------------------------------
names = st.text(alphabet="abcxyz_.0123456789'\"é", min_size=1, max_size=8)
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)  # () is a 0-d parameter


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    spec=st.dictionaries(names, shapes, min_size=0, max_size=6),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    tie=st.booleans(),
    data=st.data(),
)
def test_any_layout_round_trips_exactly(spec, dtype, tie, data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    layout = FlatLayout.from_named_tensors({n: torch.empty(s) for n, s in spec.items()})
    if tie and layout.entries:  # the first entry also answers to another name
        first = layout.entries[0]
        entries = (
            LayoutEntry(first.name, first.shape, 0, ("tied/" + first.name,)),
            *layout.entries[1:],
        )
        layout = FlatLayout(entries, layout.dtype)
    layout = FlatLayout(layout.entries, dtype)
    flat = torch.randn(layout.numel).to(dtype)
    path = tmp_path / "p.safetensors"
    meta = data.draw(
        st.dictionaries(
            st.text(min_size=1).filter(
                lambda k: k != "format" and not k.startswith("torchreparam.")
            ),
            st.text(),
            max_size=3,
        )
    )
    save_flat(path, flat, layout, metadata=meta)
    loaded = load_flat(path)
    assert loaded.layout == layout
    assert loaded.metadata == meta
    assert loaded.buffers == {}
    assert loaded.flat.dtype == dtype
    assert torch.equal(loaded.flat, flat)
    assert layout_from_json(layout_to_json(layout)) == layout
    steps = data.draw(st.integers(1, 3))
    flats = torch.randn(steps, layout.numel).to(dtype)
    save_trajectory(path, flats, layout)
    assert torch.equal(load_trajectory(path, layout=layout).flats, flats)
