"""The decoder shared by the llama, mistral, qwen2 and qwen3 families.

Weights are plain tensors (inference only): q/k/v and gate/up are fused at load time so each runs
as one matmul; adapter deltas land on column slices of the fused outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.activations import ACT2FN

from mixserve.kernels import paged_attention, write_kv
from mixserve.model.arch import ArchConfig
from mixserve.model.context import ForwardContext, LoraBatch
from mixserve.model.ffn import mlp_forward
from mixserve.model.layers import Rotary, linear, rms_norm
from mixserve.model.lora import add_site_delta, add_site_deltas


@dataclass(frozen=True, slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    post_attention_norm: torch.Tensor  # [H]
    qkv_weight: torch.Tensor  # [q + 2 kv, H]
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor  # [H, q]
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # [D] (qwen3)
    k_norm: torch.Tensor | None
    gate_up_weight: torch.Tensor  # [2I, H]
    gate_up_bias: torch.Tensor | None
    down_weight: torch.Tensor  # [H, I]
    down_bias: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class ModelWeights:
    embed_tokens: torch.Tensor  # [V, H]
    layers: tuple[LayerWeights, ...]
    final_norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H] (the embedding itself when tied)


class DecoderModel:
    """forward(input_ids, positions, ctx) over a flattened batch -> logits of ctx.logits_indices."""

    def __init__(self, arch: ArchConfig, weights: ModelWeights) -> None:
        self.arch = arch
        self.weights = weights
        self.dtype = weights.embed_tokens.dtype
        self.device = weights.embed_tokens.device
        self.rotary = Rotary(arch.rope_inv_freq, arch.rope_attention_scaling, self.device)
        self.act = ACT2FN[arch.hidden_act]
        self.attention_scale = arch.head_dim**-0.5

    def _attention(
        self,
        layer_idx: int,
        w: LayerWeights,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        ctx: ForwardContext,
    ) -> torch.Tensor:
        arch = self.arch
        num_tokens = x.shape[0]
        q_size, kv_size = arch.q_size, arch.kv_size
        qkv = linear(x, w.qkv_weight, w.qkv_bias)  # [T, q + 2kv]
        lora: LoraBatch | None = ctx.lora
        if lora is not None:
            add_site_deltas(lora, ("q_proj", "k_proj", "v_proj"), layer_idx, x, qkv)
        q = qkv[:, :q_size].view(num_tokens, arch.num_heads, arch.head_dim)
        k = qkv[:, q_size : q_size + kv_size].view(num_tokens, arch.num_kv_heads, arch.head_dim)
        v = qkv[:, q_size + kv_size :].view(num_tokens, arch.num_kv_heads, arch.head_dim)
        if w.q_norm is not None and w.k_norm is not None:
            q = rms_norm(q, w.q_norm, arch.rms_norm_eps)
            k = rms_norm(k, w.k_norm, arch.rms_norm_eps)
        q = Rotary.apply(q, cos, sin)
        k = Rotary.apply(k, cos, sin)
        k_cache, v_cache = ctx.kv_caches[layer_idx]
        write_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
        attn = paged_attention(
            q,
            k_cache,
            v_cache,
            ctx.block_tables,
            ctx.query_lens,
            ctx.seq_lens,
            scale=self.attention_scale,
            sliding_window=arch.sliding_windows[layer_idx],
        ).reshape(num_tokens, q_size)
        out = linear(attn, w.o_weight, w.o_bias)
        if lora is not None:
            add_site_delta(lora, "o_proj", layer_idx, attn, out)
        return out

    def hidden_states(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, H] (before the final norm)."""
        arch = self.arch
        h = self.weights.embed_tokens[input_ids]
        cos, sin = self.rotary.cos_sin(positions, self.dtype)
        for layer_idx, w in enumerate(self.weights.layers):
            x = rms_norm(h, w.input_norm, arch.rms_norm_eps)
            h = h + self._attention(layer_idx, w, x, cos, sin, ctx)
            x = rms_norm(h, w.post_attention_norm, arch.rms_norm_eps)
            h = h + mlp_forward(
                x,
                w.gate_up_weight,
                w.gate_up_bias,
                w.down_weight,
                w.down_bias,
                self.act,
                layer_idx,
                ctx.lora,
            )
            if ctx.between_layers is not None:
                ctx.between_layers()
        return h

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """Returns float32 logits [N, V] for the rows ctx.logits_indices."""
        h = self.hidden_states(input_ids, positions, ctx)[ctx.logits_indices]
        h = rms_norm(h, self.weights.final_norm, self.arch.rms_norm_eps)
        return linear(h, self.weights.lm_head, None).to(torch.float32)
