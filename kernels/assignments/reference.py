"""Pure-torch assignment building."""

from __future__ import annotations

import torch

from mixserve.kernels.assignments.segments import Segments


def _sorted(row_ids: torch.Tensor, group_ids: torch.Tensor, weights: torch.Tensor) -> Segments:
    order = torch.argsort(group_ids, stable=True)
    return Segments(row_ids=row_ids[order], group_ids=group_ids[order], weights=weights[order])


def build_segments(
    weights: torch.Tensor,
    row_ids: torch.Tensor,
    slot_ids: torch.Tensor,
    num_experts: int,
) -> Segments:
    rows, experts = torch.nonzero(weights > 0, as_tuple=True)
    group_ids = slot_ids[rows] * num_experts + experts
    return _sorted(row_ids[rows], group_ids, weights[rows, experts].to(torch.float32))


def concat_segments(first: Segments, second: Segments) -> Segments:
    first, second = first.trimmed(), second.trimmed()  # padded inputs from a device builder
    return _sorted(
        torch.cat([first.row_ids, second.row_ids]),
        torch.cat([first.group_ids, second.group_ids]),
        torch.cat([first.weights, second.weights]),
    )
