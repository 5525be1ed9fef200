"""The body of the cases that run in a fresh process: ``python -m benchmarks.worker``.

Prints one line of JSON: the tables of ``resnet``, or the figures of one ``wrap``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence

from torch import nn

from .context import make_context
from .large import resnet_tables
from .models import resnet
from .subprocess_run import tables_to_json
from .timing import threads
from .wrap import WRAPPERS, measure_wrap

__all__ = ["WRAP_MODELS", "main"]

WRAP_MODELS: dict[str, Callable[[], nn.Module]] = {"resnet18": resnet().build}


def _parser(models: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    cases = parser.add_subparsers(dest="case", required=True)
    rn = cases.add_parser("resnet", help="ResNet-18 forward+backward tables")
    rn.add_argument("--smoke", action="store_true")
    rn.add_argument("--allocator", default="default", help="label of the allocator settings")
    wrap = cases.add_parser("wrap", help="wrap one model once: peak extra RSS and time")
    wrap.add_argument("--model", choices=list(models), required=True)
    wrap.add_argument("--wrapper", choices=list(WRAPPERS), required=True)
    return parser


def main(
    argv: Sequence[str] | None = None, models: Mapping[str, Callable[[], nn.Module]] = WRAP_MODELS
) -> int:
    """Run one worker case and print its JSON on the last line of stdout."""
    args = _parser(list(models)).parse_args(argv)
    with threads(1):
        if args.case == "resnet":
            out = tables_to_json(resnet_tables(make_context(args.smoke), args.allocator))
        else:
            out = json.dumps(measure_wrap(models[args.model], args.wrapper))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
