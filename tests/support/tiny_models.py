"""Tiny random-weight Hugging Face models of every supported family, saved as local folders."""

from __future__ import annotations

import os

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

_COMMON = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
    "eos_token_id": 1,
    "bos_token_id": 0,
}


def tiny_config(family: str, **overrides: object) -> PretrainedConfig:
    """A 2-layer GQA config; the sliding-window families get a window shorter than the tests'
    sequences, on some layers only for qwen2/qwen3."""
    kw = {**_COMMON, **overrides}
    if family == "llama":
        return LlamaConfig(**kw)
    if family == "mistral":
        return MistralConfig(**{"sliding_window": 6, "head_dim": 16, **kw})
    if family == "qwen2":
        return Qwen2Config(
            **{"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1, **kw}
        )
    if family == "qwen3":
        return Qwen3Config(
            **{
                "head_dim": 16,
                "use_sliding_window": True,
                "sliding_window": 6,
                "max_window_layers": 1,
                **kw,
            }
        )
    raise ValueError(family)


def save_tiny_model(
    path: str,
    family: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: object,
) -> str:
    """Build a random model, give every bias and norm non-trivial values, save it; returns path."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.to(dtype)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return path


def load_reference(path: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The transformers model of a saved folder, eager attention, eval mode."""
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager"
    ).eval()


def save_tiny_tokenizer(path: str, vocab_size: int = 256) -> None:
    """A byte-level BPE tokenizer with no merges (one token per byte) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: i for i, char in enumerate(sorted(alphabet))}
    assert len(vocab) == vocab_size
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tokenizer.save_pretrained(path)
