"""Parametrizations and hook-based weight utilities after wrapping: refused at their first step,
with the model unchanged; lookups of other callers answer as on a plain module."""

from __future__ import annotations

import copy
import pickle
import re
from collections.abc import Callable

import pytest
import torch
from conftest import unchanged
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from torchreparam import ReparamModule


def _wrapped(parametrized: Callable[[nn.Module], nn.Module] | None = None) -> ReparamModule:
    torch.manual_seed(0)
    first = nn.Linear(4, 4)
    if parametrized is not None:
        parametrized(first)
    return ReparamModule(nn.Sequential(first, nn.Tanh(), nn.Linear(4, 3)))


class Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize(
    ("op", "message"),
    [
        (lambda m: parametrizations.weight_norm(m), "register_parametrization(Linear, 'weight')"),
        (lambda m: parametrize.register_parametrization(m, "bias", Double()), "(Linear, 'bias')"),
        (lambda m: nn.utils.weight_norm(m), "deleting module._parameters['weight'] of Linear"),
        (lambda m: nn.utils.spectral_norm(m), "reading module._parameters['weight'] of Linear"),
    ],
)
def test_registering_after_wrapping_is_refused_before_anything_changes(
    op: Callable[[nn.Module], object], message: str
) -> None:
    r, x = _wrapped(), torch.randn(2, 4)
    with unchanged(r, x), pytest.raises(ValueError, match=re.escape(message)) as error:
        op(r.module[0])
    assert "before wrapping" in str(error.value)
    assert type(r.module[0]).__name__ == "Linear"


@pytest.mark.parametrize("kind", ["orthogonal", "weight_norm"])
def test_removing_one_registered_before_wrapping_is_refused_before_anything_changes(
    kind: str,
) -> None:
    r, x = _wrapped(getattr(parametrizations, kind)), torch.randn(2, 4)
    message = "remove_parametrizations(ParametrizedLinear, 'weight')"
    for leave in (True, False):  # (orthogonal's right_inverse would write the original first)
        with unchanged(r, x), pytest.raises(ValueError, match=re.escape(message)):
            parametrize.remove_parametrizations(r.module[0], "weight", leave_parametrized=leave)
    assert parametrize.is_parametrized(r.module[0], "weight")


def test_other_lookups_answer_as_on_a_plain_module() -> None:
    r = _wrapped()
    net = r.module
    assert not hasattr(net[0], "parametrizations")
    assert not parametrize.is_parametrized(net[0])
    assert getattr(net[2], "parametrizations", None) is None
    assert net[0]._parameters.get("weight") is None  # (dict's own: not refused)
    assert "weight" not in net[0]._parameters
    with pytest.raises(KeyError):  # (a refusal is a KeyError too, for code that catches it)
        net[0]._parameters["weight"]
    with pytest.raises(KeyError):
        net[0]._parameters["nothing"]
    wrapped = _wrapped(parametrizations.weight_norm)
    assert parametrize.is_parametrized(wrapped.module[0], "weight")
    assert isinstance(wrapped.module[0].parametrizations, nn.ModuleDict)


def test_copies_and_pickles_keep_working() -> None:
    r, x = _wrapped(parametrizations.weight_norm), torch.randn(2, 4)
    other = copy.deepcopy(r)  # (torch pickles parametrized modules through state_dict only)
    torch.testing.assert_close(other(x), r(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="remove parametrizations before wrapping"):
        parametrize.remove_parametrizations(other.module[0], "weight")
    r = _wrapped()
    for other in (copy.deepcopy(r), pickle.loads(pickle.dumps(r))):
        torch.testing.assert_close(other(x), r(x), rtol=0, atol=0)
        with pytest.raises(ValueError, match="spectral_norm"):
            nn.utils.spectral_norm(other.module[0])
    plain = copy.deepcopy(r.module[2])  # one submodule: a plain module, a plain dict
    assert type(plain._parameters) is dict
    assert set(plain._parameters) == {"weight", "bias"}
