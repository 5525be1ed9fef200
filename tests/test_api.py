"""Every public name is documented: a docstring, and a place on the docs' API page."""

from __future__ import annotations

import inspect
from pathlib import Path

import torchreparam

API_PAGE = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_every_public_name_has_a_docstring() -> None:
    for name in torchreparam.__all__:
        obj = getattr(torchreparam, name)
        assert inspect.getdoc(obj), name
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and callable(member):
                    assert inspect.getdoc(member), f"{name}.{attr}"


def test_every_public_name_is_on_the_api_page() -> None:
    page = API_PAGE.read_text()
    for name in torchreparam.__all__:
        assert f"::: torchreparam.{name}" in page, name
