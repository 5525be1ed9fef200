"""Bad input gets one clear error, raised before anything is touched; failures leave no trace."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import build, unchanged
from torch import nn

from torchreparam import ReparamModule, StateDictMismatchError


def test_flat_param_of_the_wrong_type() -> None:
    r, _, (x,) = build("mlp")
    message = "flat_param must be a torch.Tensor of shape (66,) or (population, 66), got a list"
    with unchanged(r, x), pytest.raises(TypeError, match=re.escape(message)):
        r(x, flat_param=[0.0] * 66)


@pytest.mark.parametrize("shape", [(65,), (67,), (2, 3, 66), (0, 66), ()])
def test_flat_param_of_the_wrong_shape(shape: tuple[int, ...]) -> None:
    r, _, (x,) = build("mlp")
    message = (
        f"flat_param has shape {shape} but this module's layout needs 66 elements: "
        "pass shape (66,) or (population, 66) with population >= 1"
    )
    with unchanged(r, x), pytest.raises(ValueError, match=re.escape(message)):
        r(x, flat_param=torch.zeros(shape))


def test_single_vector_calls_refuse_a_population_clearly() -> None:
    r, _, _ = build("mlp")
    with (
        pytest.raises(
            ValueError,
            match=re.escape("flat_param has shape (2, 66), but this call takes one vector (66,)"),
        ),
        r.unflattened_param(torch.zeros(2, 66)),
    ):
        pass  # pragma: no cover


def test_flat_param_of_the_wrong_dtype() -> None:
    r, _, (x,) = build("mlp")
    message = (
        "flat_param has dtype torch.float64 but the module's parameters are torch.float32; "
        "convert it with flat_param.to(torch.float32) or convert the module with .to(torch.float64)"
    )
    with unchanged(r, x), pytest.raises(TypeError, match=re.escape(message)):
        r(x, flat_param=torch.zeros(66, dtype=torch.float64))


def test_flat_param_on_the_wrong_device() -> None:
    r, _, (x,) = build("mlp")
    message = (
        "flat_param is on meta but the module's parameters are on cpu; "
        "move it with flat_param.to('cpu') or move the module"
    )
    with unchanged(r, x), pytest.raises(ValueError, match=re.escape(message)):
        r(x, flat_param=torch.zeros(66, device="meta"))


def test_context_managers_validate_too() -> None:
    r, _, (_x,) = build("convbn")
    with (
        unchanged(r),
        pytest.raises(ValueError, match=re.escape("flat_param has shape (3,)")),
        r.unflattened_param(torch.zeros(3)),
    ):
        pass  # pragma: no cover
    with (
        unchanged(r),
        pytest.raises(ValueError, match="buffers has 1 entries"),
        r.replaced_buffers((torch.zeros(4),)),
    ):
        pass  # pragma: no cover


BUFFER_NAMES = "1.running_mean, 1.running_var, 1.num_batches_tracked"


def test_buffers_of_the_wrong_count() -> None:
    r, _, (x,) = build("convbn")
    r.eval()
    message = (
        f"buffers has 2 entries but this module has 3 buffers ({BUFFER_NAMES}); pass them all "
        "in module.buffers() order, or a dict {name: tensor} for a subset"
    )
    with unchanged(r, x), pytest.raises(ValueError, match=re.escape(message)):
        r(x, buffers=(torch.zeros(4), torch.ones(4)))  # the original truncated silently


def test_buffers_of_the_wrong_shape_and_dtype_are_all_listed() -> None:
    r, _, (x,) = build("convbn")
    r.eval()
    bad = (torch.zeros(5), torch.ones(4, dtype=torch.float64), torch.tensor(0))
    message = (
        "buffers do not match the module's buffers: "
        "1.running_mean: expected shape (4,), dtype torch.float32 on cpu, got a tensor of shape "
        "(5,), dtype torch.float32, on cpu; "
        "1.running_var: expected shape (4,), dtype torch.float32 on cpu, got a tensor of shape "
        "(4,), dtype torch.float64, on cpu"
    )
    with unchanged(r, x), pytest.raises(ValueError, match=re.escape(message)):
        r(x, buffers=bad)


def test_buffers_that_are_not_tensors() -> None:
    r, _, (x,) = build("convbn")
    with (
        unchanged(r, x),
        pytest.raises(
            TypeError,
            match=re.escape(
                "buffers has entries that are not tensors: 1.running_var: expected a tensor, got a float"
            ),
        ),
    ):
        r(x, buffers=(torch.zeros(4), 1.0, torch.tensor(0)))
    with (
        unchanged(r, x),
        pytest.raises(
            TypeError,
            match=re.escape(
                "buffers must be a tuple/list in module.buffers() order or a dict by name, got a int"
            ),
        ),
    ):
        r(x, buffers=3)


def test_buffers_dict_with_unknown_names() -> None:
    r, _, (x,) = build("convbn")
    with (
        unchanged(r, x),
        pytest.raises(
            ValueError,
            match=re.escape(
                f"buffers has unknown names ['bn.mean']; this module's buffers are {BUFFER_NAMES.split(', ')}"
            ),
        ),
    ):
        r(x, buffers={"bn.mean": torch.zeros(4)})


class Boom(RuntimeError):
    pass


def test_exception_inside_forward_leaves_the_module_intact() -> None:
    r, _, (x,) = build("convbn")
    r.eval()

    def explode(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        raise Boom("inside the module")

    with unchanged(r, x):
        handle = r.module[3].register_forward_pre_hook(explode)  # after conv+bn have run
        with pytest.raises(Boom):
            r(
                x,
                flat_param=torch.randn(r.param_numel),
                buffers=tuple(b + 1 for b in r.module.buffers()),
            )
        handle.remove()


def test_exception_inside_a_hook_that_reads_weights() -> None:
    r, _, (x,) = build("mlp")
    seen = []

    def reads_then_raises(
        module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor
    ) -> None:
        seen.append(module.weight.detach().clone())
        raise Boom("hook")

    theta = torch.randn(r.param_numel)
    with unchanged(r, x):
        handle = r.module[0].register_forward_hook(reads_then_raises)
        with pytest.raises(Boom):
            r(x, flat_param=theta)
        handle.remove()
    assert torch.equal(seen[0], r.layout.view(theta, "0.weight"))  # the hook saw theta


def test_assigning_a_managed_parameter_is_refused() -> None:
    r, _, (x,) = build("mlp")
    with (
        unchanged(r, x),
        pytest.raises(AttributeError, match="cannot assign to 'weight' of Linear"),
    ):
        r.module[0].weight = nn.Parameter(torch.zeros(7, 5))


def test_load_state_dict_mismatch_lists_everything_and_changes_nothing() -> None:
    r, twin, (x,) = build("convbn")
    bad = twin.state_dict()
    bad["0.weight"] = torch.zeros(4, 3, 2, 2)
    bad["1.running_mean"] = torch.zeros(5)
    del bad["4.bias"]
    bad["extra"] = torch.zeros(1)
    message = (
        "cannot load the state dict (nothing was changed): Missing key(s): '4.bias'; "
        "Unexpected key(s): 'extra'; 0.weight: shape (4, 3, 2, 2) in the state dict, "
        "(4, 3, 3, 3) in the module; 1.running_mean: shape (5,) in the state dict, (4,) in the module"
    )
    with unchanged(r, x), pytest.raises(StateDictMismatchError, match=re.escape(message)):
        r.load_state_dict(bad)
    with unchanged(r, x), pytest.raises(RuntimeError, match="flat_param: shape"):  # torch's type
        r.load_state_dict({"flat_param": torch.zeros(3)})


def test_wrapping_errors() -> None:
    r, _, _ = build("mlp")
    with pytest.raises(TypeError, match=re.escape("module must be a torch.nn.Module, got int")):
        ReparamModule(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="module is already a ReparamModule"):
        ReparamModule(r)
    with pytest.raises(ValueError, match="module is already managed by a ReparamModule"):
        ReparamModule(r.module)
    with pytest.raises(ValueError, match="its submodule '0' is a ReparamModule"):
        ReparamModule(nn.Sequential(r, nn.ReLU()))
    outer = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    ReparamModule(outer[1])  # the child first ...
    with pytest.raises(ValueError, match="its submodule '1' is already managed by a ReparamModule"):
        ReparamModule(outer)  # ... then its parent: refused, not half-covered
