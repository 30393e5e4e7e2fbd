"""ForwardContext: everything one forward step needs besides token ids and positions.

The runner builds it; the model only reads it. KV tensors belong to the runner, adapter tensors to
the adapter pool: the model sees both as plain tensors here and knows nothing about requests,
files or slots' owners.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mixserve.kernels import RoutingParams, Segments


@dataclass(frozen=True, slots=True)
class SiteStack:
    """One projection site's adapter weights for every slot and layer.

    Groups are ``g = slot * E + expert``; a plain-LoRA slot uses expert 0. Ranks below R are
    zero-padded, experts beyond a slot's count are zero.
    """

    lora_a: torch.Tensor  # [L, S, E, R, in]  (activation dtype)
    lora_b: torch.Tensor  # [L, S, E, out, R]
    scale: torch.Tensor  # [L, S * E] float32 (alpha / r, or alpha / sqrt(r) with rsLoRA)
    router: torch.Tensor | None  # [L, S, E, in] float32, plugin-MoE routers of this site
    # [S * E] int32: each group's true rank (0 = empty); kernels that mask ranks skip the padding.
    group_ranks: torch.Tensor

    @property
    def num_experts(self) -> int:
        return int(self.lora_a.shape[2])


@dataclass(frozen=True, slots=True)
class AdapterStacks:
    """The adapter slot pool as the model sees it: tensors only."""

    sites: Mapping[str, SiteStack]  # by projection name: q_proj ... down_proj
    ffn_router: torch.Tensor | None  # [L, S, E, H] float32, MixLoRA's router per layer
    routing: RoutingParams  # per-slot selection rule and its settings
    # Sites whose A share one storage (q/k/v, gate/up), by their names in storage order: the
    # joint A [L, S * E, n R, in] (kernels.joint_lora_a per layer), for one shrink of all n.
    joint_lora_a: Mapping[tuple[str, ...], torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SiteBatch:
    """Which rows of a step reach one projection site, and how."""

    plain: Segments | None  # plain-LoRA rows (weight 1, expert 0); the same in every layer
    routed_rows: torch.Tensor | None  # [N] rows whose slot has a router at this site
    routed_slots: torch.Tensor | None  # [N] their slots
    # route()'s per-step memo for these rows (their routing settings, the same in every layer).
    routing_memo: dict[str, object] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class FfnBatch:
    """Rows whose adapter is a MixLoRA (router over whole-FFN experts)."""

    rows: torch.Tensor  # [N] token rows, increasing
    slots: torch.Tensor  # [N]
    activations: tuple[tuple[str, torch.Tensor], ...]  # (ACT2FN name, slots using it)
    routing_memo: dict[str, object] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class LoraBatch:
    stacks: AdapterStacks
    sites: Mapping[str, SiteBatch]  # only sites that some row of this step reaches
    ffn: FfnBatch | None
    # Opt-in: routing decisions per (slot, expert), summed over layers and routed sites. The
    # model adds to it in place; [S, E] int64.
    expert_counts: torch.Tensor | None = None


def count_routed(lora: LoraBatch, slots: torch.Tensor, weights: torch.Tensor) -> None:
    """Add this router's decisions (weights [N, E] > 0 of rows in slots [N]) to the counts."""
    counts = lora.expert_counts
    if counts is None or slots.numel() == 0:
        return
    num_experts = weights.shape[1]
    counts[:, :num_experts].index_add_(0, slots, (weights > 0).to(counts.dtype))


@dataclass(frozen=True, slots=True)
class ForwardContext:
    """One step over a flattened batch: B sequences, T new tokens in sequence order."""

    slot_mapping: torch.Tensor  # [T] int64 flat KV-cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_lens: Sequence[int]  # [B] new tokens of each sequence (host)
    seq_lens: Sequence[int]  # [B] cached tokens of each sequence after this step (host)
    kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer (K, V) [NB, BS, Hkv, D]
    logits_indices: torch.Tensor  # [N] int64 rows whose next-token logits are wanted
    lora: LoraBatch | None = None
    # Called after each decoder layer (the engine's CPU thread budget follows running loads).
    between_layers: Callable[[], object] | None = None
