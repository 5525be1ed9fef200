"""Griffe extensions for the API page, loaded from ``mkdocs.yml``.

- Sphinx roles render as inline code. The docstrings are Google style with a few Sphinx
  cross-reference roles (``:class:`X```, ``:meth:`x```, ``:func:`x```). mkdocstrings does not
  read those roles and would print them verbatim, so each becomes plain inline code (`` `X` ``).
- ``Example:`` sections render as code. Griffe's Google parser knows ``Examples:`` (doctest
  blocks become highlighted ``pycon`` code) but takes the singular ``Example:`` for an
  admonition whose body is markdown, where ``>>>`` starts nested block quotes and the output
  runs into the input. The singular title is read as the plural.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:attr|class|const|data|exc|func|meth|mod|obj):`~?([^`]+)`")
EXAMPLE_TITLE = re.compile(r"^Example:[ \t]*$", re.M)  # a section title: its own line, column 0


def as_code(text: str) -> str:
    """``text`` with every Sphinx role replaced by inline code of its target."""
    return ROLE.sub(r"`\1`", text)


def examples_titled(text: str) -> str:
    """``text`` with each ``Example:`` section title written ``Examples:``."""
    return EXAMPLE_TITLE.sub("Examples:", text)


class SphinxRolesAsCode(griffe.Extension):
    """Rewrite Sphinx roles in every docstring once the object tree is built."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = as_code(obj.docstring.value)


class ExampleSectionsAsCode(griffe.Extension):
    """Read every docstring's ``Example:`` section as an ``Examples:`` one (doctest as code)."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = examples_titled(obj.docstring.value)
