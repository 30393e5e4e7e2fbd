"""Pure-torch MixLoRA experts, by whichever of two equivalent strategies is cheaper.

- sparse: assignments sorted into (slot, expert) segments, segmented GEMMs; work scales with the
  k selected experts, but each group costs a fixed overhead.
- dense: rows padded per slot, every expert's LoRA delta of a slot computed with batched GEMMs
  (E/k times the LoRA FLOPs, but a constant number of calls), the activation and weighting then
  only on the selected (row, expert) pairs.
Small batches (decode) have many one-row groups and favour dense; large ones favour sparse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

# The sub-ops' references, never their dispatching wrappers: this file is the oracle the Triton
# version is tested against, so it must not turn into Triton when MIXSERVE_KERNELS=triton.
from mixserve.kernels._grouped import PaddedGroups
from mixserve.kernels._measured import fastest
from mixserve.kernels.assignments.reference import build_segments
from mixserve.kernels.assignments.segments import Segments
from mixserve.kernels.lora.reference import lora_expand, lora_shrink

if TYPE_CHECKING:
    from mixserve.kernels.moe_lora_ffn import ExpertLora

# Rough CPU costs: a segmented-GEMM group vs. one float of an elementwise pass.
_GROUP_COST = 5e-6
_ELEMENT_COST = 0.3e-9


@dataclass(frozen=True, slots=True)
class _SlotLayout:
    """Routed rows padded to M rows a slot over the slot range; where each selected (row, expert)
    pair (the Segments' assignments) sits among every expert's padded rows."""

    rows_by_slot: PaddedGroups  # groups = slots slot_lo .. slot_lo + S - 1, M = most rows of one
    pair_index: torch.Tensor  # [P] each assignment's place in [S * E * M]


Act = Callable[[torch.Tensor], torch.Tensor]


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


def _dense(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    rows: torch.Tensor,
    segments: Segments,
    gate: ExpertLora,
    up: ExpertLora,
    down: ExpertLora,
    act: Act,
    layout: _SlotLayout,
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
        a = lora.lora_a[sl].reshape(num_slots, num_experts * rank, hidden_size)
        # [S, M, E*R], by whichever GEMM layout this machine runs faster (see _measured)
        shrunk = fastest(
            ("moe_dense_shrink", x.device.type, x.dtype, num_slots, max_rows, a.shape[1:]),
            (
                lambda: torch.bmm(a, x_pad.transpose(1, 2)).transpose(1, 2),
                lambda: torch.bmm(x_pad, a.transpose(1, 2)),
            ),
        )
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
    """strategy: "auto" (by estimated cost), "sparse" or "dense"; all compute the same function."""
    if strategy not in ("auto", "sparse", "dense"):
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
    sparse_cost = 6 * num_groups * _GROUP_COST + 8 * num_assignments * intermediate * _ELEMENT_COST
    # two passes over every expert's [S, E, M, I] deltas, then the same per-pair work as sparse
    dense_cost = (
        (2 * num_slots * num_experts * max_rows + 8 * num_assignments)
        * intermediate
        * _ELEMENT_COST
    )
    if strategy == "dense" or (strategy == "auto" and dense_cost < sparse_cost):
        order = torch.argsort(local_slot, stable=True)
        starts = counts.cumsum(0) - counts
        row_pos = torch.empty_like(order)  # [N] each row's place within its slot
        row_pos[order] = torch.arange(num_rows, device=x.device) - starts[local_slot[order]]
        rows_by_slot = PaddedGroups(
            slot_lo, 1, num_slots, max_rows, local_slot * max_rows + row_pos
        )
        # group g = slot * E + e holds its rows at [(g - slot_lo * E) * M, ...) of [S * E * M]
        pair_index = (segments.group_ids - slot_lo * num_experts) * max_rows + row_pos[
            segments.row_ids
        ]
        layout = _SlotLayout(rows_by_slot, pair_index)
        return _dense(x, gate_up, rows, segments, gate, up, down, act, layout)
    return _sparse(x, gate_up, rows, segments, gate, up, down, act)
