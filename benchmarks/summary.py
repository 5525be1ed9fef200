"""The page's opening: what is faster than what, by how much, on what machine.

Read from one device's tables (the figures of the page itself), each row linked to its table.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .maml import TORCHOPT_FUNC, TORCHOPT_META
from .peers import FUNC_FLAT, HIGHER, ORIGINAL, OURS, TORCHOPT
from .population import OURS_POP
from .report import Section, Table, md_table
from .unroll import CKPT as UNROLL_CKPT
from .unroll import FUNC as UNROLL_FUNC
from .unroll import HIGHER as UNROLL_HIGHER
from .unroll import ORIGINAL as UNROLL_ORIG

__all__ = ["in_short", "slug"]

FUNC_VMAP = "vmap over functional_call, dict from the flat vector"
ORIGINAL_VMAP = "vmap over the original torchreparam"
MAML_BEST = "torch.func: functional_call, per-tensor dict, torch._foreach_add"
COLUMNS = ("torchreparam", "functional_call", "higher", "torchopt", "original torchreparam")
Cells = tuple[str, str, str, str, str]  # one per column


def slug(title: str) -> str:
    """The anchor of a heading, as mkdocs (Python-Markdown's toc) and GitHub both make it."""
    text = re.sub(r"[^\w\s-]", "", title).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _cell(table: Table, row: str, column: int) -> str | None:
    found = table.row(row)
    return found[column] if found and column < len(found) else None


def _number(cell: str | None) -> float | None:
    found = re.match(r"-?[\d.]+", cell or "")
    return float(found.group()) if found else None


def _ratio(table: Table, row: str) -> str:
    """The row's paired ratio; — where the row is absent or has none (skipped, failed)."""
    cell = _cell(table, row, 2) or ""
    return cell if re.fullmatch(r"-?[\d.]+x", cell) else "—"


def _speedup(table: Table, row: str) -> str:
    """1 / the paired ratio; for our row, the verdict's unrounded figure where it gives one."""
    said = (
        re.search(r"speed-up over the loop ([\d.]+)x", table.verdict) if row == OURS_POP else None
    )
    if said:
        return f"{float(said.group(1)):.1f}x"
    ratio = _number(_cell(table, row, 2))
    return f"{1 / ratio:.1f}x" if ratio else "—"


@dataclass(frozen=True)
class Line:
    """One row of the summary: what, where its table is, and how each column reads it."""

    what: str
    starts: str
    has: str
    cells: Callable[[Table], Cells]


def _times(t: Table) -> Cells:
    return (
        _ratio(t, OURS),
        _ratio(t, FUNC_FLAT),
        _ratio(t, HIGHER),
        _ratio(t, TORCHOPT),
        _ratio(t, ORIGINAL),
    )


def _slopes(t: Table) -> Cells:
    return (
        _cell(t, OURS, 4) or "—",
        _cell(t, FUNC_FLAT, 4) or "—",
        "—",
        "—",
        _cell(t, ORIGINAL, 4) or "—",
    )


def _torchopt_maml(t: Table) -> str:
    """The faster of torchopt's two MAML recipes, named (its MetaSGD one on a tie)."""
    recipes = {TORCHOPT_META: "MetaSGD", TORCHOPT_FUNC: "functional sgd"}
    timed = [(_ratio(t, row), name) for row, name in recipes.items()]
    timed = [(cell, name) for cell, name in timed if cell != "—"]
    if not timed:
        return "—"
    cell, name = min(timed, key=lambda found: float(found[0].rstrip("x")))
    return f"{cell} ({name})"


def _maml(t: Table) -> Cells:
    return (
        _ratio(t, OURS),
        "1.00x (the baseline)",
        _ratio(t, HIGHER),
        _torchopt_maml(t),
        _ratio(t, ORIGINAL),
    )


def _population(t: Table) -> Cells:
    return _speedup(t, OURS_POP), _speedup(t, FUNC_VMAP), "—", "—", _speedup(t, ORIGINAL_VMAP)


def _memory(t: Table) -> Cells:
    ours, original = (_cell(t, row, 2) or "—" for row in ("torchreparam", "original torchreparam"))
    return ours, "—", "—", "—", original


def _unroll_memory(t: Table) -> Cells:
    """Growth of peak memory over the table's range of K: our exact checkpoint mode, the
    peers' full unrolls."""

    def growth(row: str) -> str:
        cell = _cell(t, row, len(t.headers) - 1)
        return f"{cell} MB" if cell else "—"

    return growth(UNROLL_CKPT), growth(UNROLL_FUNC), growth(UNROLL_HIGHER), "—", growth(UNROLL_ORIG)


LINES = (
    Line("Call with another flat vector: MLP forward, time / plain", "Forward with", "", _times),
    Line("Forward+backward to the vector: MLP, time / plain", "Forward+backward to", "", _times),
    Line("Added cost per parameter tensor, no grad", "Overhead per parameter", "no grad", _slopes),
    Line("MAML meta-step, MLP: time / fastest torch.func recipe", "MAML", "MLP", _maml),
    Line("Population in one call, MLP: speed-up over the loop", "Population", "MLP", _population),
    Line("Population in one call, conv net: same", "Population", "conv", _population),
    Line("Long inner loops, conv net: memory of 80 more inner steps (exact gradient)",
         "Long inner loops: peak memory", "", _unroll_memory),
    Line("ResNet-18 forward+backward, tuned allocator: time / plain", "ResNet-18", "tuned", _times),
    Line("Wrapping GPT-2 small: peak extra memory / weights", "Wrapping", "", _memory),
)  # fmt: skip


def _lead(section: Section) -> str:
    """One sentence: the per-call and population figures against the peers."""
    parts = []
    forward = section.table("Forward with")
    if forward is not None:
        ours, func, orig = (_number(_ratio(forward, n)) for n in (OURS, FUNC_FLAT, ORIGINAL))
        if ours and func and orig:
            parts.append(
                f"a call with another flat vector costs {ours:.2f}x the plain module's, "
                f"{func / ours:.1f}x faster than `functional_call` from the same vector and "
                f"{orig / ours:.1f}x faster than the original torchreparam"
            )
    population = section.table("Population", "MLP")
    if population is not None:
        size = re.search(r"of (\d+)", population.title)
        parts.append(
            f"{size.group(1) if size else 'many'} flat vectors in one call run "
            f"{_speedup(population, OURS_POP)} faster than a loop of calls on a small MLP, and as "
            "fast as the loop on a compute-bound conv net"
        )
    return "On this machine " + "; ".join(parts) + "." if parts else ""


def in_short(section: Section) -> list[str]:
    """The summary of one device's section: a lead sentence, the machine, a linked table."""
    rows = []
    for line in LINES:
        table = section.table(line.starts, line.has)
        if table is not None:
            rows.append((f"[{line.what}](#{slug(table.title)})", *line.cells(table)))
    if not rows:
        return []
    machine = section.env_value("machine")
    when = section.env_value("date")
    return [
        _lead(section),
        "",
        f"Measured on {machine}, torch {section.env_value('torch')}, "
        f"{section.env_value('threads')}, {when}. "
        "Times are paired ratios (lower is faster: 1.30x means 30% more time than the "
        "reference); speed-ups over the loop are higher-is-faster (below 1x: slower than the "
        "loop); for populations the peers' figures are `vmap` over them; — is not measured. Each "
        "row links to its table.",
        "",
        *md_table(("measurement", *COLUMNS), rows),
    ]
