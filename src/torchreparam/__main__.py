"""Command line: ``python -m torchreparam {demo,bench} [options]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._bench import cli as bench_cli
from ._demo import run_demo

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m torchreparam",
        description="torchreparam: any nn.Module over one flat parameter vector.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run the original README's example (ResNet-18, trace, MAML) on the CPU",
        description="Wrap a ResNet-18, check it against the unwrapped model and "
        "torch.func.functional_call, trace it, and backpropagate a MAML loss to theta_0.",
    )
    demo.add_argument("--quick", action="store_true", help="64x64 images instead of 224x224")
    demo.add_argument("--image-size", type=int, default=None, help="image side in pixels")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    bench_cli.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m torchreparam`` and the ``torchreparam`` script."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        result = run_demo(quick=args.quick, image_size=args.image_size, seed=args.seed)
        ok = result["only_flat"] and result["equal"] and result["grad_nonzero"] > 0
        return 0 if ok else 1
    if args.command == "bench":
        return bench_cli.run(args)
    return 2  # argparse rejects unknown commands before this


if __name__ == "__main__":
    sys.exit(main())
