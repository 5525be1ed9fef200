"""Result tables and the markdown page they make."""

from __future__ import annotations

import datetime
import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .timing import Timing

__all__ = [
    "TIMING_HEADERS",
    "Section",
    "Table",
    "at_least",
    "at_most",
    "environment",
    "fmt_time",
    "load_average",
    "md_table",
    "parse_section",
    "render_section",
    "timing_rows",
]


@dataclass
class Table:
    """One target's results.

    Attributes:
        key: the case that made it (``--only`` takes it).
        title: what was measured, on which model.
        target: the target, in words (empty when the table is for information).
        verdict: ``met: ...`` / ``missed: ...`` / ``not measured: ...`` / ``information``.
        headers: column titles.
        rows: one tuple of cells per contender.
        notes: lines printed under the table.
    """

    key: str
    title: str
    target: str
    verdict: str
    headers: tuple[str, ...]
    rows: list[tuple[str, ...]]
    notes: list[str] = field(default_factory=list)

    def row(self, first_cell: str) -> tuple[str, ...] | None:
        """The row whose first cell is ``first_cell``, if any."""
        return next((r for r in self.rows if r[0] == first_cell), None)


def fmt_time(seconds: float) -> str:
    """``12.3 µs`` / ``4.56 ms`` / ``1.23 s``."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


TIMING_HEADERS = ("contender", "median per call", "paired ratio", "calls x rounds")


def _fmt_ratio(ratio: float) -> str:
    """Two decimals; three significant digits below 0.1 (1 / ratio is a speed-up)."""
    return f"{ratio:.3g}x" if ratio < 0.1 else f"{ratio:.2f}x"


def timing_rows(
    timings: Mapping[str, Timing], failed: Mapping[str, str] | None = None
) -> list[tuple[str, ...]]:
    """Rows of a timing table: median, paired ratio against the baseline, sample size."""
    rows: list[tuple[str, ...]] = [
        (t.name, fmt_time(t.median), _fmt_ratio(t.ratio), f"{t.calls} x {len(t.times)}")
        for t in timings.values()
    ]
    rows += [(name, "—", why, "—") for name, why in (failed or {}).items()]
    return rows


def at_most(what: str, value: float, limit: float, unit: str = "x") -> str:
    """Verdict for a figure that must not exceed ``limit``."""
    shown = f"{what} {value:.2f}{unit}, target <= {limit:g}{unit}"
    if value <= limit:
        return f"met: {shown}"
    return f"missed: {shown} (over by {100 * (value / limit - 1):.0f}%)"


def at_least(what: str, value: float, limit: float, unit: str = "x") -> str:
    """Verdict for a figure that must reach ``limit``."""
    shown = f"{what} {value:.2f}{unit}, target >= {limit:g}{unit}"
    if value >= limit:
        return f"met: {shown}"
    return f"missed: {shown} (short by {100 * (1 - value / limit):.0f}%)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float:
    """The 1-minute load average (0 where the system does not say)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def environment(device: str, threads: int, load_at_start: float) -> list[tuple[str, str]]:
    """What the figures were measured on: machine, versions, threads, load, date."""
    machine = f"{_cpu_model()}, {os.cpu_count()} logical cores"
    if device == "cuda":
        machine = f"{torch.cuda.get_device_name()} (host: {machine})"
    return [
        ("machine", machine),
        ("system", f"{platform.system()} {platform.release()}, Python {platform.python_version()}"),
        ("torch", torch.__version__),
        ("threads", f"torch.set_num_threads({threads})" if device == "cpu" else "n/a (GPU)"),
        (
            "load average (1 min)",
            f"{load_at_start:.1f} at the start, {load_average():.1f} at the end "
            f"({os.cpu_count()} logical cores)",
        ),
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table's lines (``|`` in cells escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)]


def _targets(tables: Sequence[Table]) -> list[str]:
    rows = [(t.title, t.target, t.verdict) for t in tables if t.target]
    return md_table(("measurement", "target", "verdict"), rows) if rows else []


@dataclass
class Section:
    """One device's part of the page: its title, intro, environment and tables."""

    title: str
    intro: list[str]
    env: list[tuple[str, str]]
    tables: list[Table]

    def table(self, starts: str, has: str = "") -> Table | None:
        """The first table whose title starts with ``starts`` and contains ``has``."""
        return next((t for t in self.tables if t.title.startswith(starts) and has in t.title), None)

    def env_value(self, name: str) -> str:
        return dict(self.env).get(name, "")


def render_section(section: Section) -> str:
    """One device's part of the page: intro, environment, every table, then the targets."""
    out = [f"## {section.title}", "", *section.intro, ""]
    out += [*md_table(("", ""), section.env), ""]
    for t in section.tables:
        out += [f"### {t.title}", "", *md_table(t.headers, t.rows), ""]
        out += [f"- {n}" for n in t.notes] + ([""] if t.notes else [])
    targets = _targets(section.tables)
    if targets:
        out += [f"### Targets, {section.title}", "", TARGETS_INTRO, "", *targets, ""]
    return "\n".join(out)


TARGETS_INTRO = (
    "The goals the project set itself, judged on the paired ratio of each table above (a missed "
    "target is a goal not reached yet; the tables give the figures against each peer)."
)


def _cells(line: str) -> tuple[str, ...]:
    inner = line.strip()[1:-1]
    return tuple(c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner))


def _blocks(markdown: str) -> list[tuple[str, list[str]]]:
    """(heading, lines) for the text before the first ``###`` and under each ``###``."""
    blocks: list[tuple[str, list[str]]] = [("", [])]
    for line in markdown.splitlines():
        if line.startswith("### "):
            blocks.append((line[4:].strip(), []))
        else:
            blocks[-1][1].append(line)
    return blocks


def parse_section(markdown: str) -> Section:
    """The section :func:`render_section` wrote (this layout or the previous one), read back."""
    (_, head), *rest = _blocks(markdown)
    title = head[0].removeprefix("## ").strip()
    rows = [line for line in head if line.startswith("|")]
    env = [(c[0], c[1]) for c in map(_cells, rows[2:])]
    intro = [line for line in head[1:] if line.strip() and not line.startswith("|")]
    targets: dict[str, tuple[str, str]] = {}
    tables = []
    for heading, lines in rest:
        grid = [_cells(line) for line in lines if line.startswith("|")]
        if heading.startswith("Targets"):
            targets |= {c[0]: (c[1], c[2]) for c in grid[2:]}
            continue
        notes = [line[2:] for line in lines if line.startswith("- ")]
        tables.append(Table("", heading, "", "", grid[0], grid[2:], notes))
    for t in tables:
        t.target, t.verdict = targets.get(t.title, ("", ""))
    return Section(title, intro, env, tables)
