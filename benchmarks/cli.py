"""``python -m benchmarks``: the options, and what a run writes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .page import compose_page, write_page
from .report import Table
from .suite import CASES, run_suite

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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite as ``argv`` says; print the verdicts; write the page."""
    args = _parser().parse_args(argv)
    if args.rewrite:
        page = Path(args.out or DEFAULT_OUT)
        write_page(page, {})
        print(f"wrote {page} from its own figures")
        return 0
    devices = args.device or ["cpu", "cuda"]
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
