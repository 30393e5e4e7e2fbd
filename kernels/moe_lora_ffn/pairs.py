"""The pairs strategy of the MixLoRA expert reference (see reference.py): per selected (row,
expert) pair, so only the selected experts' B and down A are read.

Every A is applied in one batched GEMM per projection against all experts of each slot: gate/up
A over the rows padded by slot, down A over the pairs padded by slot (few rows per slot in the
steps that take this strategy, so the products of unselected experts cost less than a GEMM call
per (slot, expert) group would). The B products are rank-row bags (kernels/_rank_bags.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

# References only, never dispatching wrappers (see reference.py).
from mixserve.kernels._grouped import PaddedGroups, places_in_groups
from mixserve.kernels._measured import fastest
from mixserve.kernels._rank_bags import RankBags, bag_expand

if TYPE_CHECKING:
    from mixserve.kernels.moe_lora_ffn import ExpertLora

Act = Callable[[torch.Tensor], torch.Tensor]


def _slot_shrink(lora: ExpertLora, x_pad: torch.Tensor, sl: slice) -> torch.Tensor:
    """x_pad [S, M, in] (rows padded by slot) against every expert's A of those slots:
    [S, M, E*R], by whichever GEMM layout this machine runs faster (see _measured)."""
    num_slots, max_rows, hidden_size = x_pad.shape
    a = lora.lora_a[sl].reshape(num_slots, -1, hidden_size)  # [S, E*R, H]
    return fastest(
        ("moe_slot_shrink", x_pad.device.type, x_pad.dtype, num_slots, max_rows, a.shape[1:]),
        (
            lambda: torch.bmm(a, x_pad.transpose(1, 2)).transpose(1, 2),
            lambda: torch.bmm(x_pad, a.transpose(1, 2)),
        ),
    )


def pairs(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    pair_rows: torch.Tensor,
    experts: torch.Tensor,
    group_ids: torch.Tensor,
    gate: ExpertLora,
    up: ExpertLora,
    down: ExpertLora,
    act: Act,
    by_slot: PaddedGroups,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected pairs in row order: pair_rows, experts, group_ids [P] (slot * E + expert)."""
    num_rows, num_experts = weights.shape
    intermediate = gate_up.shape[1] // 2
    sl = slice(by_slot.group_lo, by_slot.group_lo + by_slot.num_groups)
    bags = RankBags(group_ids)
    # Pairs padded by slot: K places per row (its most pairs), a pair at its rank among its
    # row's pairs (pairs are in row order).
    pairs_per_row = torch.bincount(pair_rows, minlength=num_rows)  # [N]
    max_pairs = int(pairs_per_row.max())  # K
    row_place = by_slot.flat_pos.index_select(0, pair_rows)  # [P] in [S * M]
    pair_place = row_place * max_pairs + places_in_groups(
        pair_rows, pairs_per_row, is_sorted=True
    )  # [P] in [S * M * K]
    pairs_by_slot = PaddedGroups(
        by_slot.group_lo, 1, by_slot.num_groups, by_slot.max_rows * max_pairs, pair_place
    )
    x_pad = by_slot.pad(x.index_select(0, rows))  # [S, M, H]
    gate_up_p = gate_up.index_select(0, rows.index_select(0, pair_rows))  # [P, 2I]

    def coefficients(lora: ExpertLora, padded: torch.Tensor, place: torch.Tensor) -> torch.Tensor:
        """Each pair's scaled rank values [P, R] among the [S * rows * E] entries of the slot
        shrink of padded [S, rows, in]."""
        rank = lora.lora_a.shape[2]
        shrunk = _slot_shrink(lora, padded, sl).reshape(-1, rank)
        coef = shrunk.index_select(0, place * num_experts + experts)
        return coef.mul_(lora.scale.index_select(0, group_ids).to(x.dtype)[:, None])

    def expert_out(lora: ExpertLora, base: torch.Tensor) -> torch.Tensor:  # [P, I]
        rank = lora.lora_a.shape[2]
        coef = coefficients(lora, x_pad, row_place)
        return bag_expand(coef, lora.lora_b, bags.ids(rank), bags.per_assignment(rank)).add_(base)

    g = expert_out(gate, gate_up_p[:, :intermediate])
    u = expert_out(up, gate_up_p[:, intermediate:])
    pair_weights = weights[pair_rows, experts].to(x.dtype)
    h = act(g).mul_(u).mul_(pair_weights[:, None])  # [P, I], w h_e (the down LoRA is linear)
    hidden = x.new_zeros(num_rows, intermediate).index_add_(0, pair_rows, h)
    shrunk = coefficients(down, pairs_by_slot.pad(h), pair_place)  # [P, R]
    # one bag per row (pairs are in row order), so the bag sum adds up the row's experts
    rank = down.lora_a.shape[2]
    row_starts = pairs_per_row.cumsum(0) - pairs_per_row
    return hidden, bag_expand(shrunk, down.lora_b, bags.ids(rank), row_starts * rank)
