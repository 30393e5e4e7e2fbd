"""ArchConfig: the base model's shape and per-family switches, read from a Hugging Face config.

The four supported families share one decoder; they differ only in the switches below:
llama (optional attention/MLP bias), mistral (sliding window), qwen2 (q/k/v bias, sliding window
on some layers), qwen3 (RMSNorm on q and k per head, per-layer sliding window).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from mixserve.model.errors import ModelLoadError, UnsupportedModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# RoPE variants whose frequencies depend on the sequence length at run time.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")

# Projection sites an adapter may target, in MoE-PEFT's (= Hugging Face's) names.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


@dataclass(frozen=True, slots=True)
class ArchConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    max_position_embeddings: int
    rope_inv_freq: tuple[float, ...]  # [head_dim // 2]
    rope_attention_scaling: float
    eos_token_ids: tuple[int, ...]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def projection_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection site."""
        shapes = {
            "q_proj": (self.hidden_size, self.q_size),
            "k_proj": (self.hidden_size, self.kv_size),
            "v_proj": (self.hidden_size, self.kv_size),
            "o_proj": (self.q_size, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        return shapes[name]


def _eos_ids(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)  # type: ignore[union-attr]


def _rope(hf_config: object, config_path: str) -> tuple[tuple[float, ...], float]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type in _LENGTH_DEPENDENT_ROPE:
        raise UnsupportedModelError(config_path, f"rope_type '{rope_type}' is not supported")
    if rope_type == "default":
        import torch

        # Computed exactly as transformers does (float32 exponents), so positions agree bit for bit.
        head_dim = _head_dim(hf_config)
        base = float(params["rope_theta"])
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return tuple(float(v) for v in inv.tolist()), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise UnsupportedModelError(config_path, f"unknown rope_type '{rope_type}'")
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    return tuple(float(v) for v in inv.tolist()), float(scaling)


def _head_dim(hf_config: object) -> int:
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    return int(hf_config.hidden_size) // int(hf_config.num_attention_heads)  # type: ignore[attr-defined]


def _sliding_windows(hf_config: object) -> tuple[int | None, ...]:
    num_layers = int(hf_config.num_hidden_layers)  # type: ignore[attr-defined]
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if window is None:
        return (None,) * num_layers
    if layer_types is None:  # mistral: every layer slides when a window is set
        return (int(window),) * num_layers
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)


def arch_from_hf_config(hf_config: object, config_path: str) -> ArchConfig:
    """Map a transformers PretrainedConfig of a supported family to an ArchConfig."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            config_path,
            f"model_type '{model_type}' is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})",
        )
    inv_freq, attention_scaling = _rope(hf_config, config_path)
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    c = hf_config
    return ArchConfig(
        model_type=model_type,
        vocab_size=int(c.vocab_size),  # type: ignore[attr-defined]
        hidden_size=int(c.hidden_size),  # type: ignore[attr-defined]
        intermediate_size=int(c.intermediate_size),  # type: ignore[attr-defined]
        num_layers=int(c.num_hidden_layers),  # type: ignore[attr-defined]
        num_heads=int(c.num_attention_heads),  # type: ignore[attr-defined]
        num_kv_heads=int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads),  # type: ignore[attr-defined]
        head_dim=_head_dim(c),
        rms_norm_eps=float(c.rms_norm_eps),  # type: ignore[attr-defined]
        hidden_act=str(c.hidden_act),  # type: ignore[attr-defined]
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type in ("llama", "qwen3") and attention_bias,
        mlp_bias=model_type == "llama" and bool(getattr(c, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        sliding_windows=_sliding_windows(c),
        max_position_embeddings=int(getattr(c, "max_position_embeddings", 0) or 0),
        rope_inv_freq=inv_freq,
        rope_attention_scaling=attention_scaling,
        eos_token_ids=_eos_ids(getattr(c, "eos_token_id", None)),
    )


def load_arch(model_dir: str) -> ArchConfig:
    """Read `config.json` of a local Hugging Face folder."""
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ModelLoadError(config_path, "missing (not a Hugging Face model folder)")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(config_path, f"unreadable JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(config_path, "is not a JSON object")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            config_path,
            f"model_type '{model_type}' is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})",
        )
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(config_path, f"invalid config ({exc})") from exc
    return arch_from_hf_config(hf_config, config_path)
