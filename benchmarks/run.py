"""Run the benchmark suite from a source checkout: ``python benchmarks/run.py [--smoke] [--out F]``.

The same as ``python -m torchreparam bench`` (see ``--help``), on the checkout's ``src/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from torchreparam.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
