"""``python -m torchreparam bench``: the options, and what a run writes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .page import compose_page, write_page
from .report import Table
from .suite import CASES, run_suite

__all__ = ["add_parser", "run"]

DEFAULT_OUT = "docs/benchmarks.md"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``bench`` subcommand to ``commands``."""
    bench = commands.add_parser(
        "bench",
        help="run the benchmark suite and write docs/benchmarks.md",
        description="Time torchreparam against the plain module, torch.func.functional_call, "
        "higher, vector_to_parameters and the original torchreparam, in interleaved rounds "
        "with paired ratios, and write a markdown page with one table per target.",
    )
    bench.add_argument(
        "--smoke", action="store_true", help="tiny budgets and small models (checks every case)"
    )
    bench.add_argument(
        "--out",
        default=None,
        help=f"markdown file to write ('-': stdout); default {DEFAULT_OUT} for a full run of "
        "every case, stdout otherwise",
    )
    bench.add_argument(
        "--only",
        action="append",
        choices=list(CASES),
        default=[],
        metavar="CASE",
        help=f"run only this case (repeatable): {', '.join(CASES)}",
    )
    bench.add_argument(
        "--device",
        action="append",
        choices=["cpu", "cuda"],
        default=[],
        help="device(s) to run on (repeatable); default: cpu, and cuda where available",
    )


def _summary(tables: list[Table]) -> str:
    lines = [f"{t.title}: {t.verdict}" for t in tables if t.target]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the suite as ``args`` say; print the verdicts; write the page."""
    devices = args.device or ["cpu", "cuda"]
    sections, tables = run_suite(smoke=args.smoke, only=args.only, devices=devices)
    out = args.out
    if out is None:
        out = "-" if args.smoke or args.only else DEFAULT_OUT
    if out == "-":
        sys.stdout.write(compose_page(sections, None))
    else:
        write_page(Path(out), sections)
        print(f"wrote {out}")
    print(_summary(tables), file=sys.stderr)
    return 0
