"""Pure-torch MixLoRA experts, by whichever of three equivalent strategies is cheaper.

- sparse: assignments sorted into (slot, expert) segments, segmented GEMMs; work scales with the
  k selected experts, but each group costs a fixed overhead.
- dense: rows padded per slot, every expert's LoRA delta of a slot computed with batched GEMMs
  (E/k times the LoRA FLOPs, but a constant number of calls), the activation and weighting then
  only on the selected (row, expert) pairs.
- pairs: each selected (row, expert) pair's B products as a weighted sum of B's rank rows
  (`embedding_bag`), so only the selected experts' B (and down A) are read, at the price of no
  reuse between pairs of the same expert.
Large batches favour sparse. Decode steps have many one-row groups: pairs where each expert of a
slot has about one pair (many adapters), dense where slots have several rows each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

# The sub-ops' references, never their dispatching wrappers: this file is the oracle the Triton
# version is tested against, so it must not turn into Triton when MIXSERVE_KERNELS=triton.
from mixserve.kernels._grouped import PaddedGroups
from mixserve.kernels.assignments.reference import build_segments
from mixserve.kernels.assignments.segments import Segments
from mixserve.kernels.lora.reference import lora_expand, lora_shrink
from mixserve.kernels.moe_lora_ffn.by_slot import Act, SlotLayout, dense, pairs

if TYPE_CHECKING:
    from mixserve.kernels.moe_lora_ffn import ExpertLora

# Rough CPU costs: a segmented-GEMM group vs. one float of an elementwise pass.
_GROUP_COST = 5e-6
_ELEMENT_COST = 0.3e-9


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
    token_rows = rows.index_select(0, segments.row_ids)
    x_p = x.index_select(0, token_rows)  # [P, H]
    gate_up_p = gate_up.index_select(0, token_rows)  # [P, 2I]
    for lora, cols in ((gate, slice(0, intermediate)), (up, slice(intermediate, None))):
        a, b = lora.lora_a.flatten(0, 1), lora.lora_b.flatten(0, 1)
        shrunk = lora_shrink(x_p, a, segments, gather_rows=False)
        lora_expand(
            shrunk,
            b,
            segments,
            lora.scale[segments.group_ids],
            gate_up_p[:, cols],
            scatter_rows=False,
        )
    hidden_p = act(gate_up_p[:, :intermediate]).mul_(gate_up_p[:, intermediate:])
    # The weight goes onto h_p: the down LoRA is linear, so shrinking w h_p equals weighting later.
    hidden_p.mul_(segments.weights.to(hidden_p.dtype)[:, None])
    hidden = hidden_p.new_zeros(num_rows, intermediate)
    hidden.index_add_(0, segments.row_ids, hidden_p)
    down_delta = x.new_zeros(num_rows, down.lora_b.shape[2])
    shrunk = lora_shrink(hidden_p, down.lora_a.flatten(0, 1), segments, gather_rows=False)
    lora_expand(
        shrunk,
        down.lora_b.flatten(0, 1),
        segments,
        down.scale[segments.group_ids],
        down_delta,
        scatter_rows=True,
    )
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
    """strategy: "auto" (by estimated cost), "sparse", "dense" or "pairs"; all compute the same
    function."""
    if strategy not in ("auto", "sparse", "dense", "pairs"):
        raise ValueError(f"unknown strategy {strategy!r}")
    num_rows, num_experts = weights.shape
    intermediate = gate_up.shape[1] // 2
    if num_rows == 0:
        return x.new_zeros(0, intermediate), x.new_zeros(0, x.shape[1])
    # The selected (row, expert) pairs, sorted by (slot, expert) group; rows index into rows.
    segments = build_segments(weights, torch.arange(num_rows, device=x.device), slots, num_experts)
    num_assignments = segments.row_ids.shape[0]
    if num_assignments == 0:
        return x.new_zeros(num_rows, intermediate), x.new_zeros(num_rows, x.shape[1])
    num_groups = int(torch.unique_consecutive(segments.group_ids).numel())
    slot_lo = int(slots.min())
    local_slot = slots - slot_lo  # [N]
    counts = torch.bincount(local_slot)  # [S] rows of each slot of the range
    num_slots, max_rows = counts.shape[0], int(counts.max())
    if strategy == "auto":
        strategy = _cheapest(
            num_groups,
            num_assignments,
            num_slots * num_experts,
            max_rows,
            gate.lora_a.shape[2],
            x.shape[1],
            intermediate,
        )
    if strategy == "sparse":
        return _sparse(x, gate_up, rows, segments, gate, up, down, act)
    order = torch.argsort(local_slot, stable=True)
    starts = counts.cumsum(0) - counts
    row_pos = torch.empty_like(order)  # [N] each row's place within its slot
    row_pos[order] = torch.arange(num_rows, device=x.device) - starts[local_slot[order]]
    rows_by_slot = PaddedGroups(slot_lo, 1, num_slots, max_rows, local_slot * max_rows + row_pos)
    if strategy == "pairs":
        return pairs(x, gate_up, rows, slots, weights, gate, up, down, act, rows_by_slot)
    # group g = slot * E + e holds its rows at [(g - slot_lo * E) * M, ...) of [S * E * M]
    pair_index = (segments.group_ids - slot_lo * num_experts) * max_rows + row_pos[segments.row_ids]
    layout = SlotLayout(rows_by_slot, pair_index)
    return dense(x, gate_up, rows, segments, gate, up, down, act, layout)


def _cheapest(
    num_groups: int,
    num_pairs: int,
    num_slot_groups: int,
    max_rows: int,
    rank: int,
    hidden_size: int,
    intermediate: int,
) -> str:
    """The strategy estimated cheapest for num_pairs selected pairs in num_groups (slot, expert)
    groups, over num_slot_groups = S * E groups of slots with up to max_rows rows."""
    elementwise = 8 * num_pairs * intermediate  # the per-pair FFN, the same in every strategy
    sparse = 6 * num_groups * _GROUP_COST + elementwise * _ELEMENT_COST
    # two passes over every expert's [S, E, M, I] deltas
    padded = 2 * num_slot_groups * max_rows * intermediate
    if sparse <= (padded + elementwise) * _ELEMENT_COST:
        return "sparse"
    # Dense and pairs by the floats each moves: dense reads every expert's weights and writes
    # and reads back [S, E, M, I] per projection; pairs reads all A of gate/up, but only the
    # selected experts' B and (gathered, so three times) down A.
    dense_floats = num_slot_groups * rank * 3 * (hidden_size + intermediate) + 3 * padded
    pairs_floats = num_slot_groups * rank * 2 * hidden_size + num_pairs * rank * (
        5 * intermediate + hidden_size
    )
    return "pairs" if pairs_floats < dense_floats else "dense"
