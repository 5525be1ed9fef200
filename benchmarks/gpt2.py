"""GPT-2 models from Hugging Face ``transformers`` (optional), built offline from a config."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .models import Model, seeded

try:  # optional peer model: its rows are skipped when transformers is not installed
    import transformers
except ImportError:
    transformers = None  # type: ignore[assignment,unused-ignore]

__all__ = ["available", "gpt2", "gpt2_small_124m"]


def available() -> bool:
    """Whether ``transformers`` imported."""
    return transformers is not None


def _build(config: Any) -> nn.Module:
    assert transformers is not None  # callers check available() first
    model = transformers.GPT2LMHeadModel(config)
    model.train()
    return model


def gpt2(layers: int = 2, width: int = 128, heads: int = 4, seq: int = 64, batch: int = 2) -> Model:
    """A small GPT-2 (tied input and output embeddings, GPT-2's 50,257-token vocabulary)."""
    assert transformers is not None, "transformers is not installed"
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, n_positions=seq)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    name = f"GPT-2 {layers} layers x {width} wide, {batch}x{seq} tokens"
    return Model(name, seeded(lambda: _build(config)), (ids,), ids)


def gpt2_small_124m() -> Model:
    """GPT-2 small as released (124M parameters): ``GPT2Config()`` defaults."""
    assert transformers is not None, "transformers is not installed"
    config = transformers.GPT2Config()
    ids = torch.zeros(1, 8, dtype=torch.long)
    return Model("GPT-2 small (124M)", seeded(lambda: _build(config)), (ids,), ids)
