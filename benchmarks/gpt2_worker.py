"""The worker, able to build GPT-2 models too: ``python -m benchmarks.gpt2_worker``.

A module of its own so that the other workers never import ``transformers`` (seconds).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn

from . import gpt2, worker

__all__ = ["GPT2_MODELS"]

GPT2_MODELS: dict[str, Callable[[], nn.Module]] = {}
if gpt2.available():
    GPT2_MODELS = {"gpt2-124m": gpt2.gpt2_small_124m().build, "gpt2-small": gpt2.gpt2().build}

if __name__ == "__main__":
    sys.exit(worker.main(sys.argv[1:], {**worker.WRAP_MODELS, **GPT2_MODELS}))
