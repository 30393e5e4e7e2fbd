"""Pure-torch MixLoRA experts, by whichever of two equivalent strategies is cheaper.

- sparse: assignments sorted into (slot, expert) segments, segmented GEMMs; work scales with the
  k selected experts, but each group costs a fixed overhead.
- dense: rows padded per slot, every expert of a slot computed with batched GEMMs and weighted
  by w (0 for unselected experts); E/k times the LoRA work, but a constant number of calls.
Small batches (decode) have many one-row groups and favour dense; large ones favour sparse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

# The sub-ops' references, never their dispatching wrappers: this file is the oracle the Triton
# version is tested against, so it must not turn into Triton when MIXSERVE_KERNELS=triton.
from mixserve.kernels._measured import fastest
from mixserve.kernels.assignments.reference import build_segments
from mixserve.kernels.lora.reference import lora_expand, lora_shrink

if TYPE_CHECKING:
    from mixserve.kernels.moe_lora_ffn import ExpertLora

# Rough CPU costs: a segmented-GEMM group vs. one float of an elementwise pass.
_GROUP_COST = 5e-6
_ELEMENT_COST = 0.3e-9


@dataclass(frozen=True, slots=True)
class _SlotLayout:
    """Routed rows grouped by slot and padded: row order[j] sits at [local_slot[j], pos[j]]."""

    order: torch.Tensor  # [N] rows sorted by slot (stable)
    slot_lo: int  # first slot of the range
    num_slots: int  # S: slots in the range, used or not
    local_slot: torch.Tensor  # [N] slot - slot_lo, in sorted order
    pos: torch.Tensor  # [N] position within its slot
    max_rows: int  # M: most rows of one slot


Act = Callable[[torch.Tensor], torch.Tensor]


def _sparse(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    gate: ExpertLora,
    up: ExpertLora,
    down: ExpertLora,
    act: Act,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_rows, num_experts = weights.shape
    intermediate = gate_up.shape[1] // 2
    local = torch.arange(num_rows, device=x.device)
    segments = build_segments(weights, local, slots, num_experts)
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
    weights: torch.Tensor,
    gate: ExpertLora,
    up: ExpertLora,
    down: ExpertLora,
    act: Act,
    layout: _SlotLayout,
) -> tuple[torch.Tensor, torch.Tensor]:
    order, slot_lo, num_slots = layout.order, layout.slot_lo, layout.num_slots
    max_rows = layout.max_rows
    num_experts = weights.shape[1]
    intermediate = gate_up.shape[1] // 2
    hidden_size = x.shape[1]
    num_groups = num_slots * num_experts
    sl = slice(slot_lo, slot_lo + num_slots)
    # padded_row[i]: where row i sits in the [S * M] padded rows.
    padded_row = torch.empty_like(order)
    padded_row[order] = layout.local_slot * max_rows + layout.pos

    def padded(values: torch.Tensor) -> torch.Tensor:  # [N, D] -> [S, M, D], zero padding
        out = values.new_zeros(num_slots * max_rows, values.shape[1])
        out.index_copy_(0, padded_row, values)
        return out.view(num_slots, max_rows, values.shape[1])

    x_pad = padded(x.index_select(0, rows))  # [S, M, H]
    gate_up_pad = padded(gate_up.index_select(0, rows))  # [S, M, 2I]
    w_pad = padded(weights.to(x.dtype))  # [S, M, E]

    def expert_projection(lora: ExpertLora, base: torch.Tensor) -> torch.Tensor:
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
        delta = torch.bmm(scaled.view(num_groups, max_rows, rank), b)
        return delta.view(num_slots, num_experts, max_rows, intermediate).add_(base[:, None])

    gate_all = expert_projection(gate, gate_up_pad[..., :intermediate])  # [S, E, M, I]
    up_all = expert_projection(up, gate_up_pad[..., intermediate:])
    hidden_all = act(gate_all).mul_(up_all).mul_(w_pad.transpose(1, 2)[..., None])  # w h_e
    hidden_pad = hidden_all.sum(1)  # [S, M, I]
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
    hidden = hidden_pad.view(-1, intermediate).index_select(0, padded_row)  # [N, I]
    down_delta = delta_pad.view(-1, hidden_size).index_select(0, padded_row)  # [N, H]
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
    order = torch.argsort(slots, stable=True)
    sorted_slots = slots.index_select(0, order)
    slot_lo = int(sorted_slots[0])
    num_slots = int(sorted_slots[-1]) - slot_lo + 1
    counts = torch.bincount(sorted_slots - slot_lo, minlength=num_slots)
    max_rows = int(counts.max())
    selected = weights > 0
    num_assignments = int(selected.sum())
    group_keys = (slots[:, None] * num_experts + torch.arange(num_experts, device=x.device))[
        selected
    ]
    num_groups = int(torch.unique(group_keys).numel())
    sparse_cost = 6 * num_groups * _GROUP_COST + 8 * num_assignments * intermediate * _ELEMENT_COST
    dense_cost = 6 * num_slots * num_experts * max_rows * intermediate * _ELEMENT_COST
    if strategy == "dense" or (strategy == "auto" and dense_cost < sparse_cost):
        local_slot = sorted_slots - slot_lo
        starts = counts.cumsum(0) - counts
        pos = torch.arange(num_rows, device=x.device) - starts[local_slot]
        layout = _SlotLayout(order, slot_lo, num_slots, local_slot, pos, max_rows)
        return _dense(x, gate_up, rows, weights, gate, up, down, act, layout)
    return _sparse(x, gate_up, rows, slots, weights, gate, up, down, act)
