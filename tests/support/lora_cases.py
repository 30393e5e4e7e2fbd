"""What the routed-LoRA op tests share (tests/kernels/test_lora_ops.py for the reference,
tests/kernels/triton/lora_triton_cases.py for Triton): dtypes with their tolerances, the ranks
mixed in one batch, and the shape of a test scenario."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]
# Relative to the largest expected magnitude.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}
RANKS = [4, 8, 16, 32, 64]


@dataclass(frozen=True)
class Scenario:
    num_tokens: int
    num_slots: int
    num_experts: int
    hidden: int  # K
    out_features: int  # N_out
    max_fanout: int  # experts per token, 1..max_fanout
    used_groups: tuple[int, ...] | None = None  # restrict assignments to these groups

    @property
    def num_groups(self) -> int:
        return self.num_slots * self.num_experts


def padded_stack(
    num_groups: int, ranks: list[int], rows: int, cols: int, rank_dim: int, gen: torch.Generator
) -> torch.Tensor:
    """[G, rows, cols] random, zero beyond each group's rank along rank_dim (1 or 2)."""
    t = torch.randn(num_groups, rows, cols, generator=gen)
    size = t.shape[rank_dim]
    in_rank = torch.arange(size)[None, :] < torch.tensor(ranks)[:, None]  # [G, R]
    return t * (in_rank[:, :, None] if rank_dim == 1 else in_rank[:, None, :])


def lora_stacks(sc: Scenario, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(lora_a [G, R, K], lora_b [G, N_out, R], rank per group) in float32, zero past each
    group's rank. One rank per adapter slot, shared by its experts; slots cycle through RANKS."""
    max_rank = max(RANKS) if sc.num_groups > 1 else 8
    slot_ranks = [RANKS[s % len(RANKS)] if sc.num_groups > 1 else 8 for s in range(sc.num_slots)]
    ranks = [slot_ranks[g // sc.num_experts] for g in range(sc.num_groups)]
    lora_a = padded_stack(sc.num_groups, ranks, max_rank, sc.hidden, 1, gen) / math.sqrt(sc.hidden)
    lora_b = padded_stack(sc.num_groups, ranks, sc.out_features, max_rank, 2, gen)
    lora_b = lora_b / torch.tensor(ranks, dtype=torch.float32).sqrt()[:, None, None]
    return lora_a, lora_b, ranks
