"""Command line: ``python -m torchreparam demo [options]``.

The benchmark suite is not part of the package: ``python -m benchmarks`` from a clone of the
repository.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._demo import run_demo

__all__ = ["main"]

BENCH_MOVED = (
    "The benchmark suite is not part of the installed package. From a clone of the repository, "
    "after 'pip install -e .', run: python -m benchmarks --help"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m torchreparam",
        description="torchreparam: any nn.Module over one flat parameter vector.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="show what torchreparam is for, each claim checked as it prints (CPU)",
        description="On an MLP: wrap it and compare with the plain model, call it with another "
        "vector against torch.func.functional_call, a population of vectors in one call timed "
        "against the loop, a call that raises leaving the model unchanged, threads each with "
        "their own vector. On a ResNet-18: wrap, compare, trace, and a MAML meta-gradient.",
    )
    demo.add_argument(
        "--quick", action="store_true", help="32x32 images instead of 224x224, fewer repeats"
    )
    demo.add_argument("--image-size", type=int, default=None, help="image side in pixels")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    commands.add_parser(
        "bench",
        help="moved: the benchmark suite is 'python -m benchmarks' in a clone of the repository",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m torchreparam`` and the ``torchreparam`` script."""
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "bench":  # whatever its options, say where the suite went
        print(BENCH_MOVED, file=sys.stderr)
        return 2
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "demo":
        result = run_demo(quick=args.quick, image_size=args.image_size, seed=args.seed)
        return 0 if result["ok"] else 1
    return 2  # argparse rejects unknown commands before this


if __name__ == "__main__":
    sys.exit(main())
