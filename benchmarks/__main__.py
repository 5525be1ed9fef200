"""``python -m benchmarks [--smoke] [--only CASE] [--device D] [--out FILE]`` (see ``--help``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
