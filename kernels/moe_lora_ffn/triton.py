"""MixLoRA experts on the Triton routed-LoRA kernels: the reference's sparse strategy on device.

Launches per call: device assignment building (a sort), one fused gate+up shrink (x read once),
one fused gate+up expand into per-assignment rows (on top of their base projections), torch
elementwise act * up * weight, one down shrink and one down expand scattering into rows. The
grids depend on P = N * E (every cell of the routing matrix), never on the routing itself, so
the whole op is capturable in a CUDA graph.

The padded per-assignment buffers cost N * E rows where only the selected cells are real. When
they would be large and no CUDA graph is being captured (prefill), the segments are trimmed to
their real count first: one host sync, against E / k times the elementwise work and memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from mixserve.kernels.assignments.segments import Segments
from mixserve.kernels.assignments.triton import build_segments
from mixserve.kernels.lora.triton import (
    lora_expand,
    lora_expand_pair,
    lora_shrink,
    lora_shrink_pair,
)

if TYPE_CHECKING:
    from mixserve.kernels.moe_lora_ffn import ExpertLora

# Trim padded segments (one host sync) when the padded per-assignment buffers exceed this.
COMPACT_ABOVE_BYTES = 64 << 20


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _maybe_compact(segments: Segments, bytes_per_row: int) -> Segments:
    padded_bytes = segments.row_ids.shape[0] * bytes_per_row
    if padded_bytes <= COMPACT_ABOVE_BYTES or _capturing(segments.row_ids):
        return segments
    return segments.trimmed()


def _pair_ranks(gate: ExpertLora, up: ExpertLora) -> torch.Tensor | None:
    """One rank per group for the fused gate/up launch: the larger of the two (past a
    projection's own rank its columns are zero, so reading up to the larger rank is exact)."""
    if gate.group_ranks is None or up.group_ranks is None:
        return None
    return torch.maximum(gate.group_ranks, up.group_ranks)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    num_rows, num_experts = weights.shape
    intermediate = gate_up.shape[1] // 2
    hidden_size = x.shape[1]
    if num_rows == 0:
        return x.new_zeros(0, intermediate), x.new_zeros(0, hidden_size)
    local = torch.arange(num_rows, device=x.device)
    segments = build_segments(weights, local, slots, num_experts)  # row ids index rows / weights
    # gate_up_p and hidden_p: 3 I values per assignment.
    segments = _maybe_compact(segments, 3 * intermediate * x.element_size())
    group_ids = segments.group_ids
    token_rows = rows.index_select(0, segments.row_ids)  # [P] token of each assignment
    by_token = Segments(token_rows, group_ids, segments.weights, segments.num_valid)

    gate_up_ranks = _pair_ranks(gate, up)
    shrunk_gate, shrunk_up = lora_shrink_pair(
        x,
        gate.lora_a.flatten(0, 1),
        up.lora_a.flatten(0, 1),
        by_token,
        gather_rows=True,
        group_ranks=gate_up_ranks,
    )  # [P, R] each
    gate_up_p = gate_up.index_select(0, token_rows)  # [P, 2I]: base projections per assignment
    lora_expand_pair(
        shrunk_gate, shrunk_up, gate.lora_b.flatten(0, 1), up.lora_b.flatten(0, 1), segments,
        gate.scale[group_ids], up.scale[group_ids],
        gate_up_p[:, :intermediate], gate_up_p[:, intermediate:], scatter_rows=False,
        group_ranks=gate_up_ranks,
    )  # fmt: skip
    hidden_p = act(gate_up_p[:, :intermediate]).mul_(gate_up_p[:, intermediate:])  # [P, I]
    # Weight on h_p (the down LoRA is linear); padding has weight 0, so its rows vanish here.
    hidden_p.mul_(segments.weights.to(hidden_p.dtype)[:, None])
    hidden = hidden_p.new_zeros(num_rows, intermediate)
    hidden.index_add_(0, segments.row_ids, hidden_p)

    shrunk_down = lora_shrink(
        hidden_p, down.lora_a.flatten(0, 1), segments, gather_rows=False,
        group_ranks=down.group_ranks,
    )  # [P, R]  # fmt: skip
    down_delta = x.new_zeros(num_rows, down.lora_b.shape[2])  # [N, H]
    lora_expand(
        shrunk_down, down.lora_b.flatten(0, 1), segments, down.scale[group_ids], down_delta,
        scatter_rows=True, group_ranks=down.group_ranks,
    )  # fmt: skip
    return hidden, down_delta
