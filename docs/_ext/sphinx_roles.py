"""A griffe extension for the API page: Sphinx roles in docstrings render as inline code.

The docstrings are Google style with a few Sphinx cross-reference roles (``:class:`X```,
``:meth:`x```, ``:func:`x```). mkdocstrings does not read those roles and would print them
verbatim, so this turns each into plain inline code (`` `X` ``). Loaded from ``mkdocs.yml``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:attr|class|const|data|exc|func|meth|mod|obj):`~?([^`]+)`")


def as_code(text: str) -> str:
    """``text`` with every Sphinx role replaced by inline code of its target."""
    return ROLE.sub(r"`\1`", text)


class SphinxRolesAsCode(griffe.Extension):
    """Rewrite Sphinx roles in every docstring once the object tree is built."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = as_code(obj.docstring.value)
