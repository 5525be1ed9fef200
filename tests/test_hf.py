"""Hugging Face transformers built from small configs (no downloads): GPT-2 (tied embeddings),
BERT and a Llama-style decoder, wrapped, against the unwrapped twin."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402  (after the importorskip)
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from torchreparam import ReparamModule  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

SMALL = {"vocab_size": 50}
MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(
            n_layer=2, n_head=2, n_embd=16, n_positions=32, bos_token_id=0, eos_token_id=0, **SMALL
        )
    ),
    "bert": lambda: BertModel(
        BertConfig(
            num_hidden_layers=2,
            num_attention_heads=2,
            hidden_size=16,
            intermediate_size=32,
            max_position_embeddings=32,
            **SMALL,
        )
    ),
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            hidden_size=16,
            intermediate_size=32,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=0,
            **SMALL,
        )
    ),
}


def _out(output) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


@pytest.fixture(params=list(MODELS))
def model(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    net = MODELS[request.param]().eval()
    return request.param, net, copy.deepcopy(net), torch.randint(0, 50, (2, 7))


def test_wrapping_keeps_outputs_and_counts_tied_weights_once(model) -> None:  # type: ignore[no-untyped-def]
    name, net, twin, ids = model
    r = ReparamModule(net)
    assert r.param_numel == sum(p.numel() for p in twin.parameters())  # tied: once
    assert torch.equal(_out(r(input_ids=ids)), _out(twin(input_ids=ids)))  # keyword-only call
    if name == "gpt2":
        assert r.layout["transformer.wte.weight"].aliases == ("lm_head.weight",)
    assert net.device == torch.device("cpu")  # the original raised StopIteration here
    assert net.dtype == torch.float32
    assert net.num_parameters() == twin.num_parameters()


def test_other_vectors_match_functional_call_in_values_and_gradients(model) -> None:  # type: ignore[no-untyped-def]
    _, net, twin, ids = model
    r = ReparamModule(net)
    theta = (r.flat_param.detach() + 0.01 * torch.randn(r.param_numel)).requires_grad_()
    ref = theta.detach().clone().requires_grad_()
    out = _out(r(input_ids=ids, flat_param=theta))
    expected = _out(
        torch.func.functional_call(twin, r.layout.unflatten(ref), (), {"input_ids": ids})
    )
    torch.testing.assert_close(out, expected)
    out.square().mean().backward()
    expected.square().mean().backward()
    torch.testing.assert_close(theta.grad, ref.grad)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_with_own_weights_and_with_another_vector(name: str) -> None:
    torch.manual_seed(0)
    net = MODELS[name]().eval()
    twin = copy.deepcopy(net)
    r = ReparamModule(net)
    ids = torch.randint(1, 50, (1, 5))
    kw = {
        "max_new_tokens": 4,
        "do_sample": False,
        "attention_mask": torch.ones_like(ids),
        "pad_token_id": 0,
    }
    assert torch.equal(net.generate(ids, **kw), twin.generate(ids, **kw))
    theta = r.flat_param.detach() * 1.5
    with torch.no_grad():
        for p, v in zip(twin.parameters(), r.layout.unflatten(theta).values(), strict=True):
            p.copy_(v)
    with r.unflattened_param(theta):  # generation with another vector, in this thread
        assert torch.equal(net.generate(ids, **kw), twin.generate(ids, **kw))


def test_save_pretrained_and_from_pretrained(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, net, twin, ids = model
    r = ReparamModule(net)
    with torch.no_grad():
        r.flat_param.mul_(0.5)  # trained through the wrapper
    net.save_pretrained(tmp_path)
    loaded = type(twin).from_pretrained(tmp_path).eval()  # by someone without torchreparam
    torch.testing.assert_close(_out(loaded(input_ids=ids)), _out(net(input_ids=ids)))
    fresh = ReparamModule(MODELS_BY_TYPE[type(twin)]().eval())
    fresh.load_state_dict(loaded.state_dict())  # back into a wrapper, from original keys
    torch.testing.assert_close(fresh.flat_param, r.flat_param)


MODELS_BY_TYPE = {
    GPT2LMHeadModel: MODELS["gpt2"],
    BertModel: MODELS["bert"],
    LlamaForCausalLM: MODELS["llama"],
}
