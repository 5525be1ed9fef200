"""The benchmarks page: fixed text, then one section per device, each kept until re-measured."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from .report import Table, parse_section, render_section
from .summary import in_short

__all__ = ["merge_tables", "compose_page", "write_page"]

TITLE = """\
# Benchmarks

torchreparam against the plain module, `torch.func.functional_call`, `higher`,
`vector_to_parameters` and the original torchreparam, each table measured side by side in one
process. Written by the benchmark suite (`python -m benchmarks`, [below](#running-the-suite));
do not edit by hand.
"""

FOOTER = """\
## Method

- Every contender of a table runs in the same process, in interleaved rounds: each round
  runs every contender for a block of calls (about 20 ms), in an order that rotates from round
  to round; the garbage collector is off within a block (as `timeit` does).
- A contender's time is the median over rounds of its time per call; its ratio is the median
  over rounds of its time divided by the baseline's time in the same round (a paired ratio),
  which cancels most of the drift of a shared machine. The baseline is the first row. When
  the machine's load changes during a run, two medians can be far apart while the paired
  ratio stays put: read the ratio.
- CPU figures use `torch.set_num_threads(1)`: they measure overhead, not parallel kernels.
- The machine is shared and noisy: compare ratios within one table rather than absolute
  times across tables or runs.
- Targets are judged on the paired ratio, with one allowance: a "never slower" target whose
  ratio is just over 1 counts as met within noise when the middle half of the per-round ratios
  reaches 1 (the verdict then gives that spread).
- The original torchreparam is re-implemented faithfully inside the suite
  (`benchmarks/original.py`): `torch.cat` into `flat_param`, then on every call
  `split` + `.view`, `setattr` on the modules, the call, and `setattr` back.

## Allocator note (Linux, glibc)

glibc serves every allocation over 32 MB with a fresh `mmap` and gives it back to the system
when it is freed, so a large tensor made anew at every step is page-faulted in again each
time. A flat gradient is such a tensor: for a ResNet-18 (47 MB) that is about 12,000 minor
page faults per forward+backward (measured here: 12,300 per step with glibc's defaults, 0 with
the settings below; `loss.backward()` into an existing `flat_param.grad` pays them too, as the
backward makes a fresh flat gradient before adding it). Per-tensor gradients stay under the
threshold and do not pay this. Every flat-vector approach pays it, the original included (see
the two ResNet-18 tables below). To let glibc keep and reuse freed memory, set before
starting Python:

```bash
export MALLOC_MMAP_THRESHOLD_=2147483647 MALLOC_TRIM_THRESHOLD_=2147483647
```

or preload another allocator (jemalloc, tcmalloc). The same holds for non-fused optimizers
over one flat parameter, whose temporaries are flat too: Adam over a 47 MB `flat_param`
took 22,800 page faults per step with `foreach=False`, 11,400 with `foreach=True` and none
with `fused=True` (measured here, default allocator). Prefer `fused=True`.
## Running the suite

From the repository's root, after `pip install -e .` (the suite is not part of the package):

```bash
python -m benchmarks              # the full suite (about 5 minutes), writes docs/benchmarks.md
python -m benchmarks --smoke      # tiny budgets: checks that every case runs
python -m benchmarks --only maml  # one case (see --help for the list)
```

The optional peers come from `pip install higher transformers tqdm`; a peer that is not
installed is listed as skipped. A run keeps the sections of the devices it did not measure.
"""

PLACEHOLDERS = {
    "cpu": "## CPU, one thread\n\nNot measured yet: run `python -m benchmarks`.",
    "cuda": "## CUDA\n\nNot measured: the machine of the last run had no CUDA device "
    "(`torch.cuda.is_available()` was False). The suite runs its GPU cases by itself where "
    "one is present and publishes them here, apart from the CPU figures.",
}


def _section_of(page: str, name: str) -> str | None:
    found = re.search(rf"<!-- bench:{name} -->\n(.*?)\n<!-- /bench:{name} -->", page, re.S)
    return found.group(1) if found else None


def compose_page(sections: Mapping[str, str], existing: str | None) -> str:
    """The page: the summary of the first measured device, then each device's section (new, or
    kept from ``existing``), then the method."""
    bodies = {n: sections.get(n) or (existing and _section_of(existing, n)) for n in PLACEHOLDERS}
    # each measured section read back and written again: kept ones take the current layout
    measured = {n: parse_section(b) for n, b in bodies.items() if b and "\n|" in b}  # has tables
    parts = [TITLE]
    summary = next((lines for lines in map(in_short, measured.values()) if lines), [])
    if summary:
        parts += ["## In short", "", *summary, ""]
    for name, placeholder in PLACEHOLDERS.items():
        body = render_section(measured[name]) if name in measured else placeholder
        parts += [f"<!-- bench:{name} -->", body.strip(), f"<!-- /bench:{name} -->", ""]
    parts.append(FOOTER)
    return "\n".join(parts)


def merge_tables(path: Path, device: str, tables: Sequence[Table], note: str) -> None:
    """Put ``tables`` (a partial run's) into ``device``'s section of the page at ``path``: a
    table of the same title is replaced, a new one goes after the others; each gets ``note``
    (when and how it was measured: the section's environment is the last full run's).

    Raises:
        ValueError: the page has no measured section for ``device`` (run the full suite first).
    """
    page = path.read_text()
    body = _section_of(page, device)
    if not body or "\n|" not in body:
        raise ValueError(f"{path} has no measured {device} section to merge into: run the suite")
    section = parse_section(body)
    for table in tables:
        table.notes = [*table.notes, note]
        titles = [t.title for t in section.tables]
        if table.title in titles:
            section.tables[titles.index(table.title)] = table
        else:
            section.tables.append(table)
    path.write_text(compose_page({device: render_section(section)}, page))


def write_page(path: Path, sections: Mapping[str, str]) -> None:
    """Write the page to ``path``, keeping the sections of devices this run did not measure."""
    existing = path.read_text() if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(compose_page(sections, existing))
