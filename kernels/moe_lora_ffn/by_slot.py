"""The two MixLoRA expert strategies that pad routed rows by slot (see reference.py):

- dense: every expert's LoRA delta of a slot with batched GEMMs, then the per-pair FFN;
- pairs: only the selected experts' B (and down A), read per (row, expert) pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

# References only, never dispatching wrappers (see reference.py).
from mixserve.kernels._grouped import PaddedGroups
from mixserve.kernels._measured import fastest
from mixserve.kernels.assignments.segments import Segments

if TYPE_CHECKING:
    from mixserve.kernels.moe_lora_ffn import ExpertLora

Act = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class SlotLayout:
    """Routed rows padded to M rows a slot over the slot range; where each selected (row, expert)
    pair (the Segments' assignments) sits among every expert's padded rows."""

    rows_by_slot: PaddedGroups  # groups = slots slot_lo .. slot_lo + S - 1, M = most rows of one
    pair_index: torch.Tensor  # [P] each assignment's place in [S * E * M]


def _slot_shrink(lora: ExpertLora, x_pad: torch.Tensor, sl: slice) -> torch.Tensor:
    """x_pad [S, M, H] (rows padded by slot) against every expert's A of those slots: [S, M, E*R],
    by whichever GEMM layout this machine runs faster (see _measured)."""
    num_slots, max_rows, hidden_size = x_pad.shape
    a = lora.lora_a[sl].reshape(num_slots, -1, hidden_size)  # [S, E*R, H]
    return fastest(
        ("moe_dense_shrink", x_pad.device.type, x_pad.dtype, num_slots, max_rows, a.shape[1:]),
        (
            lambda: torch.bmm(a, x_pad.transpose(1, 2)).transpose(1, 2),
            lambda: torch.bmm(x_pad, a.transpose(1, 2)),
        ),
    )


def _rank_rows(lora: ExpertLora) -> torch.Tensor:
    """[S * E * R, out]: row (slot * E + e) * R + j is column j of that expert's B. A view on the
    pool's storage, which keeps B transposed for this (a copy for other layouts)."""
    return lora.lora_b.mT.reshape(-1, lora.lora_b.shape[2])


def pairs(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    gate: ExpertLora,
    up: ExpertLora,
    down: ExpertLora,
    act: Act,
    by_slot: PaddedGroups,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_rows, num_experts = weights.shape
    intermediate = gate_up.shape[1] // 2
    rank = gate.lora_a.shape[2]
    sl = slice(by_slot.group_lo, by_slot.group_lo + by_slot.num_groups)
    selected = weights > 0
    pair_rows, experts = torch.nonzero(selected, as_tuple=True)  # [P], in row order
    num_pairs = pair_rows.shape[0]
    group_ids = slots.index_select(0, pair_rows) * num_experts + experts  # [P]
    # pair p's bag: the R rank rows of its group in _rank_rows
    bag_ids = (group_ids[:, None] * rank + torch.arange(rank, device=x.device)).flatten()
    pair_bags = torch.arange(0, num_pairs * rank, rank, device=x.device)
    # each pair's rank values among the [S * M * E] (row, expert) entries of _slot_shrink
    shrunk_index = by_slot.flat_pos.index_select(0, pair_rows) * num_experts + experts
    x_pad = by_slot.pad(x.index_select(0, rows))  # [S, M, H]
    gate_up_p = gate_up.index_select(0, rows.index_select(0, pair_rows))  # [P, 2I]

    def expert_out(lora: ExpertLora, base: torch.Tensor) -> torch.Tensor:  # [P, I]
        coef = _slot_shrink(lora, x_pad, sl).reshape(-1, rank).index_select(0, shrunk_index)
        coef.mul_(lora.scale.index_select(0, group_ids).to(x.dtype)[:, None])  # [P, R]
        delta = F.embedding_bag(
            bag_ids, _rank_rows(lora), pair_bags, mode="sum", per_sample_weights=coef.flatten()
        )
        return delta.add_(base)

    g = expert_out(gate, gate_up_p[:, :intermediate])
    u = expert_out(up, gate_up_p[:, intermediate:])
    pair_weights = weights[pair_rows, experts].to(x.dtype)
    h = act(g).mul_(u).mul_(pair_weights[:, None])  # [P, I], w h_e (the down LoRA is linear)
    hidden = x.new_zeros(num_rows, intermediate).index_add_(0, pair_rows, h)
    a = down.lora_a.flatten(0, 1).index_select(0, group_ids)  # [P, R, I]
    shrunk = torch.bmm(a, h[:, :, None]).squeeze(-1)  # [P, R]
    shrunk.mul_(down.scale.index_select(0, group_ids).to(x.dtype)[:, None])
    # one bag per row (pairs are in row order), so the bag sum adds up the row's experts
    pairs_per_row = selected.sum(1)
    row_bags = (pairs_per_row.cumsum(0) - pairs_per_row) * rank
    down_delta = F.embedding_bag(
        bag_ids, _rank_rows(down), row_bags, mode="sum", per_sample_weights=shrunk.flatten()
    )
    return hidden, down_delta


def dense(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    rows: torch.Tensor,
    segments: Segments,
    gate: ExpertLora,
    up: ExpertLora,
    down: ExpertLora,
    act: Act,
    layout: SlotLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    by_slot = layout.rows_by_slot
    num_slots, max_rows = by_slot.num_groups, by_slot.max_rows
    num_rows, num_experts = rows.shape[0], gate.lora_a.shape[1]
    intermediate = gate_up.shape[1] // 2
    hidden_size = x.shape[1]
    num_groups = num_slots * num_experts
    sl = slice(by_slot.group_lo, by_slot.group_lo + num_slots)
    x_pad = by_slot.pad(x.index_select(0, rows))  # [S, M, H], zero padding

    def expert_delta(lora: ExpertLora) -> torch.Tensor:  # [S * E * M, I]
        rank = lora.lora_a.shape[2]
        shrunk = _slot_shrink(lora, x_pad, sl)  # [S, M, E*R]
        scaled = torch.empty(
            (num_slots, num_experts, max_rows, rank), dtype=x.dtype, device=x.device
        )
        torch.mul(
            shrunk.view(num_slots, max_rows, num_experts, rank).transpose(1, 2),
            lora.scale.view(-1, num_experts)[sl, :, None, None].to(x.dtype),
            out=scaled,
        )
        b = lora.lora_b[sl].reshape(num_groups, intermediate, rank).transpose(1, 2)  # [G, R, I]
        return torch.bmm(scaled.view(num_groups, max_rows, rank), b).view(-1, intermediate)

    # Every expert's delta is computed (one GEMM per group, no per-group work), but the
    # elementwise FFN runs only on the P selected pairs: E/k times fewer values.
    gate_up_p = gate_up.index_select(0, rows.index_select(0, segments.row_ids))  # [P, 2I]
    g = expert_delta(gate).index_select(0, layout.pair_index).add_(gate_up_p[:, :intermediate])
    u = expert_delta(up).index_select(0, layout.pair_index).add_(gate_up_p[:, intermediate:])
    # w h_e: the weight goes onto h, since the down LoRA is linear
    h = act(g).mul_(u).mul_(segments.weights.to(x.dtype)[:, None])  # [P, I]
    hidden = x.new_zeros(num_rows, intermediate).index_add_(0, segments.row_ids, h)
    hidden_all = x.new_zeros(num_groups * max_rows, intermediate)  # unselected experts: 0
    hidden_all.index_copy_(0, layout.pair_index, h)
    rank = down.lora_a.shape[2]
    a = down.lora_a[sl].reshape(num_groups, rank, intermediate)
    shrunk = torch.bmm(hidden_all.view(num_groups, max_rows, intermediate), a.transpose(1, 2))
    # [S, M, E, R]: each slot's experts side by side, so one GEMM per slot over E*R both applies
    # every expert's B and sums the experts.
    shrunk_by_slot = torch.empty(
        (num_slots, max_rows, num_experts, rank), dtype=x.dtype, device=x.device
    )
    torch.mul(
        shrunk.view(num_slots, num_experts, max_rows, rank).transpose(1, 2),
        down.scale.view(-1, num_experts)[sl, None, :, None].to(x.dtype),
        out=shrunk_by_slot,
    )
    b = down.lora_b[sl].transpose(-1, -2).reshape(num_slots, num_experts * rank, hidden_size)
    delta_pad = torch.bmm(shrunk_by_slot.view(num_slots, max_rows, num_experts * rank), b)
    down_delta = by_slot.unpad(delta_pad)  # [N, H]
    return hidden, down_delta
