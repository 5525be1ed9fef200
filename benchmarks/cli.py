"""``python -m benchmarks``: the options, and what a run writes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import torch

from .page import compose_page, merge_tables, write_page
from .report import Table, load_average
from .suite import CASES, run_device, run_suite

__all__ = ["DEFAULT_OUT", "main"]

# The repository's page, wherever the suite is run from.
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time torchreparam against the plain module, torch.func.functional_call, "
        "higher, vector_to_parameters and the original torchreparam, in interleaved rounds "
        "with paired ratios, and write a markdown page with one table per target.",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny budgets and small models (checks every case)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="markdown file to write ('-': stdout); default: the repository's "
        "docs/benchmarks.md for a full run of every case, stdout otherwise",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(CASES),
        default=[],
        metavar="CASE",
        help=f"run only this case (repeatable): {', '.join(CASES)}",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --only: put the measured tables into the page (replacing those of the same "
        "title), each noted with the date and load of this run, instead of printing them",
    )
    parser.add_argument(
        "--rewrite",
        action="store_true",
        help="measure nothing: write the page again from its own figures (after a change to "
        "the page's layout)",
    )
    parser.add_argument(
        "--device",
        action="append",
        choices=["cpu", "cuda"],
        default=[],
        help="device(s) to run on (repeatable); default: cpu, and cuda where available",
    )
    return parser


def _summary(tables: list[Table]) -> str:
    lines = [f"{t.title}: {t.verdict}" for t in tables if t.target]
    return "\n".join(lines)


def _merge(page: Path, only: Sequence[str], devices: Sequence[str]) -> int:
    """Run ``only`` on each available device and merge its tables into ``page``."""
    command = " ".join(f"--only {o}" for o in only)
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            continue
        load = load_average()
        _, tables = run_device(device, False, only)
        note = (
            f"measured {date.today().isoformat()} by `python -m benchmarks {command} --merge` "
            f"(load average at start {load:.1f}), apart from the full run this section's "
            "environment describes"
        )
        merge_tables(page, device, tables, note)
        print(f"merged {len(tables)} {device} table(s) into {page}")
        print(_summary(tables), file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite as ``argv`` says; print the verdicts; write the page."""
    args = _parser().parse_args(argv)
    if args.rewrite:
        page = Path(args.out or DEFAULT_OUT)
        write_page(page, {})
        print(f"wrote {page} from its own figures")
        return 0
    if args.merge and (not args.only or args.smoke):
        print("--merge takes --only (a partial run) and no --smoke", file=sys.stderr)
        return 2
    devices = args.device or ["cpu", "cuda"]
    if args.merge:
        return _merge(Path(args.out or DEFAULT_OUT), args.only, devices)
    sections, tables = run_suite(smoke=args.smoke, only=args.only, devices=devices)
    out = args.out
    if out is None:
        out = "-" if args.smoke or args.only else str(DEFAULT_OUT)
    if out == "-":
        sys.stdout.write(compose_page(sections, None))
    else:
        write_page(Path(out), sections)
        print(f"wrote {out}")
    print(_summary(tables), file=sys.stderr)
    return 0
