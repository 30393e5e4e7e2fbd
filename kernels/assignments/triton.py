"""Device-side assignment building: fixed-size outputs, no host synchronisation.

Every (row, expert) cell of the routing matrix is a candidate assignment, so P_max = N * E' is
known from shapes alone. Cells with weight <= 0 get a sentinel key that sorts after every real
group; one stable device sort then yields the segments followed by padding, and the count of
real assignments stays on the device (``num_valid``). All of it is capturable in a CUDA graph.
Plain torch device ops suffice (a handful of elementwise launches around one sort of N * E keys);
no custom Triton kernel is needed here.

Padding entries carry weight 0, a real row id (the row of their cell) and the last valid group
id (0 when there is none), so arrays stay non-decreasing and every index stays in range.
"""

from __future__ import annotations

import torch

from mixserve.kernels.assignments.segments import Segments

# Sorts after any real group id (slot * E + expert stays far below it).
_SENTINEL = torch.iinfo(torch.int64).max


def _sort_valid_first(
    keys: torch.Tensor, valid: torch.Tensor, num_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, sorted group ids with padding, sorted validity) for a stable masked-key sort."""
    masked = torch.where(valid, keys, torch.full_like(keys, _SENTINEL))
    sorted_keys, order = torch.sort(masked, stable=True)
    valid_sorted = torch.arange(keys.shape[0], device=keys.device) < num_valid
    # Padding repeats the last valid group: non-decreasing and in range for gathers.
    group_ids = torch.where(valid_sorted, sorted_keys, torch.zeros_like(sorted_keys))
    group_ids = torch.cummax(group_ids, dim=0).values
    return order, group_ids, valid_sorted


def build_segments(
    weights: torch.Tensor,
    row_ids: torch.Tensor,
    slot_ids: torch.Tensor,
    num_experts: int,
) -> Segments:
    num_rows, width = weights.shape  # [N, E']
    device = weights.device
    experts = torch.arange(width, device=device)
    keys = (slot_ids[:, None] * num_experts + experts[None, :]).reshape(-1)  # [N * E']
    flat_weights = weights.reshape(-1).to(torch.float32)
    valid = flat_weights > 0
    num_valid = valid.sum()  # [] int64, stays on the device
    # Cells are in row-major order, so the stable sort keeps rows in order inside a group.
    order, group_ids, valid_sorted = _sort_valid_first(keys, valid, num_valid)
    sorted_weights = flat_weights.index_select(0, order)
    return Segments(
        row_ids=row_ids.index_select(0, torch.div(order, width, rounding_mode="floor")),
        group_ids=group_ids,
        weights=torch.where(valid_sorted, sorted_weights, torch.zeros_like(sorted_weights)),
        num_valid=num_valid,
    )


def _valid_mask(segments: Segments) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid [P] bool, num_valid [] int64) without leaving the device."""
    size = segments.row_ids.shape[0]
    device = segments.row_ids.device
    if segments.num_valid is None:
        # Fill kernels, not host-to-device copies: safe inside a CUDA graph capture.
        everything = torch.full((), size, dtype=torch.int64, device=device)
        return torch.ones(size, dtype=torch.bool, device=device), everything
    num_valid = segments.num_valid.to(torch.int64)
    return torch.arange(size, device=device) < num_valid, num_valid


def concat_segments(first: Segments, second: Segments) -> Segments:
    valid_a, count_a = _valid_mask(first)
    valid_b, count_b = _valid_mask(second)
    valid = torch.cat([valid_a, valid_b])
    num_valid = count_a + count_b
    # Stable: inside a group, first's assignments precede second's, each in its own order.
    order, group_ids, valid_sorted = _sort_valid_first(
        torch.cat([first.group_ids, second.group_ids]), valid, num_valid
    )
    weights = torch.cat([first.weights, second.weights]).index_select(0, order)
    return Segments(
        row_ids=torch.cat([first.row_ids, second.row_ids]).index_select(0, order),
        group_ids=group_ids,
        weights=torch.where(valid_sorted, weights, torch.zeros_like(weights)),
        num_valid=num_valid,
    )
