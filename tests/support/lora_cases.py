"""What the routed-LoRA op tests share (tests/kernels/test_lora_ops.py for the reference,
tests/kernels/triton/lora_triton_cases.py for Triton): dtypes with their tolerances, the ranks
mixed in one batch, the shape of a test scenario, and the joint-site cases with their oracle
(tests/kernels/test_lora_apply_joint.py and its Triton twin)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from mixserve.kernels import Segments
from mixserve.kernels.lora import reference

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


JOINT_GROUPS, JOINT_RANK, JOINT_HIDDEN = 12, 8, 40
JOINT_WIDTHS = (40, 16, 16)  # q, k, v of a grouped-query layer
JOINT_RANKS = (4, 8, 8)  # each site's true rank: q's is the smallest, zero-padded to 8


@dataclass(frozen=True)
class JointSites:
    """Sites whose A share one [G, in, n, R] storage (as the pool keeps q/k/v)."""

    lora_as: list[torch.Tensor]  # n x [G, R, in] views of the storage
    lora_bs: list[torch.Tensor]  # n x [G, out_i, R]
    scales: list[torch.Tensor]  # n x [G] float32
    group_ranks: list[torch.Tensor]  # n x [G] int32


def joint_sites(dtype: torch.dtype, gen: torch.Generator) -> JointSites:
    shape = (JOINT_GROUPS, JOINT_HIDDEN, len(JOINT_WIDTHS), JOINT_RANK)
    storage = torch.randn(*shape, generator=gen) / 4
    lora_bs = []
    for i, (width, rank) in enumerate(zip(JOINT_WIDTHS, JOINT_RANKS, strict=True)):
        storage[:, :, i, rank:] = 0
        lora_bs.append(padded_stack(JOINT_GROUPS, [rank] * JOINT_GROUPS, width, JOINT_RANK, 2, gen))
    storage = storage.to(dtype)
    return JointSites(
        [storage[:, :, i].mT for i in range(len(JOINT_WIDTHS))],
        [(b / 3).to(dtype) for b in lora_bs],
        [torch.rand(JOINT_GROUPS, generator=gen) + 0.5 for _ in JOINT_WIDTHS],
        [torch.full((JOINT_GROUPS,), r, dtype=torch.int32) for r in JOINT_RANKS],
    )


def joint_segments(layout: str, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(row_ids, group_ids, weights) sorted by group, one assignment per row listed (weights not
    all 1, as routed sites have), in the layout named."""
    if layout == "decode":  # two rows per group, not consecutive
        groups = torch.arange(24) % JOINT_GROUPS
    elif layout == "runs":  # two prefill chunks of one group each
        groups = torch.tensor([3] * 20 + [7] * 18)
    elif layout == "runs_and_rest":  # a chunk, then decode rows of other groups
        groups = torch.tensor([5] * 24 + [0, 2, 2, 9, 11])
    elif layout == "decode_popular":  # 11 rows of a popular group, 1-2 of the rest
        groups = torch.tensor([5] * 11 + [0, 1, 2, 2, 3, 4, 6, 6, 7, 9, 10, 11])
        rows = torch.randperm(groups.shape[0], generator=gen)  # no row runs
        order = torch.argsort(groups, stable=True)
        weights = torch.rand(rows.shape[0], generator=gen) + 0.25
        return rows[order], groups[order], weights[order]
    elif layout == "runs_and_many_rows":  # a chunk, then 12 rows of one group, not consecutive
        groups = torch.tensor([4] * 20 + [1, 6] * 12)
    else:  # "many_rows": groups of many rows, not consecutive (no runs)
        groups = torch.arange(40) % 3
    rows = torch.arange(groups.shape[0])
    order = torch.argsort(groups, stable=True)
    weights = torch.rand(rows.shape[0], generator=gen) + 0.25
    return rows[order], groups[order], weights[order]


def per_site(x: torch.Tensor, sites: JointSites, segments: Segments, out: torch.Tensor) -> None:
    """The joint ops' oracle: the reference lora_apply of each site on its columns of out."""
    col = 0
    for lora_a, lora_b, scale in zip(sites.lora_as, sites.lora_bs, sites.scales, strict=True):
        width = lora_b.shape[1]
        part = out[:, col : col + width]
        reference.lora_apply(x, lora_a, lora_b, segments, None, part, group_scale=scale)
        col += width
