"""Pure-torch MixLoRA experts, by whichever of two equivalent strategies is cheaper.

Both expand through rank-row bags (kernels/_rank_bags.py: only the selected experts' B is read,
with no call per (slot, expert) group) and run the per-pair FFN on the selected pairs only.
They differ in the shrinks (x A and h A_down):
- sparse: assignments sorted into (slot, expert) segments, segmented GEMMs: each group's A is
  read once for all its rows, but each group costs a GEMM call;
- pairs (pairs.py): every expert's A of a slot in one batched GEMM over the rows (gate/up) or
  pairs (down) padded by slot: no per-group calls, but the unselected experts' products are
  computed and B is not reused between pairs of a group.
Pairs pays where most groups have one pair (decode steps over many adapters); sparse elsewhere.
(A third strategy, every expert's delta of a slot with batched GEMMs, lost to both once the
expands became bags, and was removed: see bench/RESULTS.md, session 13.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

# The sub-ops' references, never their dispatching wrappers: this file is the oracle the Triton
# version is tested against, so it must not turn into Triton when MIXSERVE_KERNELS=triton.
from mixserve.kernels._grouped import PaddedGroups, places_in_groups
from mixserve.kernels._rank_bags import RankBags, bag_expand
from mixserve.kernels.assignments.segments import Segments
from mixserve.kernels.lora.reference import lora_shrink
from mixserve.kernels.moe_lora_ffn.pairs import Act, pairs

if TYPE_CHECKING:
    from mixserve.kernels.moe_lora_ffn import ExpertLora

# Rough CPU costs, fitted on Intel Xeon (2 vCPU, 2026-12-04) to the time difference of the two
# strategies over six decode and prefill shapes: one group's GEMM call in a segmented shrink;
# one float pairs moves beyond what sparse does.
_GROUP_COST = 8e-6
_PAIRS_FLOAT_COST = 0.13e-9


def _sparse(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    rows: torch.Tensor,
    segments: Segments,
    gate: ExpertLora,
    up: ExpertLora,
    down: ExpertLora,
    act: Act,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_rows = rows.shape[0]
    intermediate = gate_up.shape[1] // 2
    group_ids = segments.group_ids
    token_rows = rows.index_select(0, segments.row_ids)
    x_p = x.index_select(0, token_rows)  # [P, H]
    gate_up_p = gate_up.index_select(0, token_rows)  # [P, 2I]
    # Shrinks as segmented GEMMs (each group's A read once for its rows), expands as rank-row
    # bags (kernels/_rank_bags.py): no per-group call for the products whose output is I or H wide.
    bags = RankBags(group_ids)

    def expand(lora: ExpertLora, rows_p: torch.Tensor) -> torch.Tensor:  # [P, out]
        rank = lora.lora_a.shape[2]
        shrunk = lora_shrink(rows_p, lora.lora_a.flatten(0, 1), segments, gather_rows=False)
        shrunk.mul_(lora.scale.index_select(0, group_ids).to(x.dtype)[:, None])  # [P, R]
        return bag_expand(shrunk, lora.lora_b, bags.ids(rank), bags.per_assignment(rank))

    g = expand(gate, x_p).add_(gate_up_p[:, :intermediate])
    u = expand(up, x_p).add_(gate_up_p[:, intermediate:])
    # The weight goes onto h_p: the down LoRA is linear, so shrinking w h_p equals weighting later.
    hidden_p = act(g).mul_(u).mul_(segments.weights.to(x.dtype)[:, None])  # [P, I]
    hidden = hidden_p.new_zeros(num_rows, intermediate).index_add_(0, segments.row_ids, hidden_p)
    down_p = expand(down, hidden_p)  # [P, H]
    down_delta = x.new_zeros(num_rows, down_p.shape[1]).index_add_(0, segments.row_ids, down_p)
    return hidden, down_delta


def moe_lora_ffn(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    gate: ExpertLora,
    up: ExpertLora,
    down: ExpertLora,
    act: Callable[[torch.Tensor], torch.Tensor],
    strategy: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """strategy: "auto" (by estimated cost), "sparse" or "pairs"; both compute the same
    function."""
    if strategy not in ("auto", "sparse", "pairs"):
        raise ValueError(f"unknown strategy {strategy!r}")
    num_rows, num_experts = weights.shape
    intermediate = gate_up.shape[1] // 2
    if num_rows == 0:
        return x.new_zeros(0, intermediate), x.new_zeros(0, x.shape[1])
    # The selected (row, expert) pairs in row order; rows index into rows.
    pair_rows, experts = torch.nonzero(weights > 0, as_tuple=True)  # [P]
    num_assignments = pair_rows.shape[0]
    if num_assignments == 0:
        return x.new_zeros(num_rows, intermediate), x.new_zeros(num_rows, x.shape[1])
    group_ids = slots.index_select(0, pair_rows) * num_experts + experts  # [P]
    slot_lo = int(slots.min())
    local_slot = slots - slot_lo  # [N]
    counts = torch.bincount(local_slot)  # [S] rows of each slot of the range
    num_slots = counts.shape[0]
    if strategy == "auto":
        used = torch.bincount(group_ids - slot_lo * num_experts)  # [<= S * E]
        strategy = _cheapest(
            int((used > 0).sum()),
            num_assignments,
            num_slots * num_experts,
            gate.lora_a.shape[2],
            x.shape[1],
            intermediate,
        )
    if strategy == "sparse":  # the same pairs, sorted by (slot, expert) group
        order = torch.argsort(group_ids, stable=True)
        segments = Segments(
            row_ids=pair_rows[order],
            group_ids=group_ids[order],
            weights=weights[pair_rows, experts].to(torch.float32)[order],
        )
        return _sparse(x, gate_up, rows, segments, gate, up, down, act)
    max_rows = int(counts.max())
    row_pos = places_in_groups(local_slot, counts)  # [N] each row's place within its slot
    rows_by_slot = PaddedGroups(slot_lo, 1, num_slots, max_rows, local_slot * max_rows + row_pos)
    return pairs(
        x, gate_up, rows, weights, pair_rows, experts, group_ids, gate, up, down, act, rows_by_slot
    )


def _cheapest(
    num_groups: int,
    num_pairs: int,
    num_slot_groups: int,
    rank: int,
    hidden_size: int,
    intermediate: int,
) -> str:
    """sparse or pairs for num_pairs selected pairs in num_groups (slot, expert) groups, over
    num_slot_groups = S * E groups of the slots they use.

    Both run the same per-pair FFN and bag expands. Sparse pays its three shrinks' per-group
    GEMM calls; pairs reads every expert's A of the slots, its pairs' B without reuse between
    pairs of one expert, and pads the pairs' hidden rows by slot (written, read again)."""
    sparse = 3 * num_groups * _GROUP_COST
    slot_a = num_slot_groups * rank * (2 * hidden_size + intermediate)
    pairs_floats = (
        slot_a + num_pairs * rank * (2 * intermediate + hidden_size) + 2 * num_pairs * intermediate
    )
    return "pairs" if pairs_floats * _PAIRS_FLOAT_COST < sparse else "sparse"
