"""(row, expert, weight) assignments sorted into (slot, expert) segments.

A segment is the run of assignments that share one group ``g = slot * E + expert``: the LoRA
kernels gather the A/B pair of group g once per segment. Plain LoRA is the one-expert case
(weight 1 on expert 0).
"""

from __future__ import annotations

import torch

from mixserve.kernels._dispatch import use_triton
from mixserve.kernels.assignments import reference
from mixserve.kernels.assignments.segments import Segments


def build_segments(
    weights: torch.Tensor,
    row_ids: torch.Tensor,
    slot_ids: torch.Tensor,
    num_experts: int,
) -> Segments:
    """Sort the non-zero entries of a dense routing matrix into (slot, expert) segments.

    Semantics: for every (i, e) with ``weights[i, e] > 0`` one assignment
    ``(row_ids[i], slot_ids[i] * num_experts + e, weights[i, e])``; assignments sorted by group,
    ties in row order.

    Shapes: weights [N, E'] float32 with E' <= num_experts; row_ids [N] int64; slot_ids [N]
    int64. The reference returns exact-size Segments (P = number of positive weights,
    num_valid None); the device builder returns P = N * E' entries, the valid ones first and
    their count in ``num_valid`` (no host synchronisation).
    """
    if use_triton(weights):
        from mixserve.kernels.assignments import triton as device

        return device.build_segments(weights, row_ids, slot_ids, num_experts)
    return reference.build_segments(weights, row_ids, slot_ids, num_experts)


def concat_segments(first: Segments, second: Segments) -> Segments:
    """Merge two segment lists into one sorted list (a site mixing plain and routed rows).

    Stable: inside a group, ``first``'s assignments come before ``second``'s. Either input may be
    padded (``num_valid`` set). The device version returns P = P_first + P_second entries with
    ``num_valid`` set; the reference one the exact-size merge.
    """
    if use_triton(first.row_ids):
        from mixserve.kernels.assignments import triton as device

        return device.concat_segments(first, second)
    return reference.concat_segments(first, second)


__all__ = ["Segments", "build_segments", "concat_segments"]
