"""Segmented (grouped) matrix multiply shared by the torch reference implementations.

Three ways to the same function, picked per call:
- groups of few rows (at most 8; decode steps: a few rows per adapter), with at most ~4 padding
  rows per real one: the rows padded into [groups, max rows, K] and one batched GEMM. On CPU this
  is 3-6x faster than grouped_mm, which runs one small GEMM per group;
- `torch.nn.functional.grouped_mm`: one GEMM per group over jagged row ranges in a single call (on
  CPU too, for fp32/bf16/fp16) as long as every stride is a multiple of 16 bytes;
- where a layout does not qualify, or the group range is mostly empty (each group, empty or not,
  costs grouped_mm a fixed overhead), a per-group loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")
# Past this many rows in a group, padding writes (and gathers back) more than grouped_mm's
# per-group GEMM call costs.
_MAX_PADDED_ROWS = 8
# Rough CPU costs that pick between one GEMM over a whole group range (every row against every
# group, the unwanted products discarded) and segmented work on the products that count: a FLOP
# of a large GEMM; a segmented call's fixed cost (sort, index builds, padding, scatter); a FLOP
# of its small per-group GEMMs.
_DENSE_FLOP_COST = 1 / 150e9
_SEGMENTED_FIXED_COST = 100e-6
_SEGMENTED_FLOP_COST = 1 / 15e9


def dense_range_is_cheaper(
    num_rows: int, num_groups: int, num_products: int, flops_per_product: int
) -> bool:
    """Whether num_rows rows against each of num_groups groups in one GEMM is estimated to beat
    segmented work on the num_products (row, group) products that are wanted."""
    dense = num_rows * num_groups * flops_per_product * _DENSE_FLOP_COST
    segmented = _SEGMENTED_FIXED_COST + num_products * flops_per_product * _SEGMENTED_FLOP_COST
    return dense <= segmented


def _aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    if t.data_ptr() % 16:
        return False
    inner_ok = t.stride(-1) == 1 and (t.stride(-2) * size) % 16 == 0
    transposed_ok = t.stride(-2) == 1 and (t.stride(-1) * size) % 16 == 0
    outer_ok = t.dim() < 3 or (t.stride(0) * size) % 16 == 0
    return (inner_ok or transposed_ok) and outer_ok


def grouped_matmul(
    a: torch.Tensor, b: torch.Tensor, sorted_group_ids: torch.Tensor
) -> torch.Tensor:
    """out[p] = a[p] @ b[sorted_group_ids[p]].

    a: [P, K]; b: [G, K, N] (any strides); sorted_group_ids: [P] int64, non-decreasing.
    Returns [P, N] in a's dtype.
    """
    num_rows = a.shape[0]
    if num_rows == 0:
        return a.new_zeros((0, b.shape[-1]))
    group_lo = int(sorted_group_ids[0])
    group_hi = int(sorted_group_ids[-1]) + 1
    counts = torch.bincount(sorted_group_ids - group_lo, minlength=group_hi - group_lo)
    b_range = b[group_lo:group_hi]
    num_nonempty = int((counts > 0).sum())
    max_rows = int(counts.max())
    # Up to ~4 zero rows per real one: with at most 8 rows a group, the padded rows cost about
    # what the group's weights do, while grouped_mm pays a GEMM call per group (many adapters
    # with 1-2 rows each in a decode step).
    if num_nonempty * max_rows <= 4 * num_rows + 16 and max_rows <= _MAX_PADDED_ROWS:
        return _padded_bmm(a, b_range, counts, max_rows)
    mostly_empty = (group_hi - group_lo) > 4 * num_nonempty + 16
    if _HAS_GROUPED_MM and not mostly_empty and a.dtype == b.dtype:
        a_c = a if _aligned(a) else a.contiguous()
        if _aligned(a_c) and _aligned(b_range):
            offsets = counts.cumsum(0).to(torch.int32)
            return F.grouped_mm(a_c, b_range, offs=offsets)
    out = a.new_empty((num_rows, b.shape[-1]))
    start = 0
    for local_group, count in enumerate(counts.tolist()):
        if count:
            end = start + count
            out[start:end] = a[start:end] @ b_range[local_group].to(a.dtype)
            start = end
    return out


def _padded_bmm(
    a: torch.Tensor, b_range: torch.Tensor, counts: torch.Tensor, max_rows: int
) -> torch.Tensor:
    """grouped_matmul as one bmm: a's rows (sorted by group; counts [G] per group of b_range)
    padded to [U, max_rows, K] over the U non-empty groups."""
    num_rows, k = a.shape
    used = torch.nonzero(counts, as_tuple=True)[0]  # [U]
    used_counts = counts.index_select(0, used)  # [U]
    num_used = used.shape[0]
    b_used = b_range if num_used == counts.shape[0] else b_range.index_select(0, used)
    b_used = b_used.to(a.dtype)  # [U, K, N]
    if num_used * max_rows == num_rows:  # every group full: a is already [U, M, K] in order
        return torch.bmm(a.reshape(num_used, max_rows, k), b_used).reshape(num_rows, -1)
    group_of_row = torch.repeat_interleave(
        torch.arange(num_used, device=a.device), used_counts
    )  # [P]
    starts = used_counts.cumsum(0) - used_counts
    pos = torch.arange(num_rows, device=a.device) - starts.index_select(0, group_of_row)
    a_pad = a.new_zeros(num_used, max_rows, k)
    a_pad[group_of_row, pos] = a
    return torch.bmm(a_pad, b_used)[group_of_row, pos]  # [P, N]


def segment_matmul(x: torch.Tensor, b: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """out[i] = x[i] @ b[group_ids[i]] for rows in any order.

    x: [N, K]; b: [G, K, N_out]; group_ids: [N] int64. Returns [N, N_out] in x's dtype.
    When rows x groups is small (a router over the step's adapters), one GEMM against the whole
    group range and a gather of each row's own group beat sorting into segments.
    """
    num_rows, k, n = x.shape[0], b.shape[1], b.shape[2]
    if num_rows == 0:
        return x.new_zeros((0, n))
    group_lo = int(group_ids.min())
    span = int(group_ids.max()) + 1 - group_lo
    if dense_range_is_cheaper(num_rows, span, num_rows, 2 * k * n):
        # [K, span * N_out]: a view when b is the transpose of [G, N_out, K] storage (routers).
        b_range = b[group_lo : group_lo + span].permute(1, 0, 2).reshape(k, span * n)
        products = (x @ b_range.to(x.dtype)).view(num_rows, span, n)
        return products[torch.arange(num_rows, device=x.device), group_ids - group_lo]
    order = torch.argsort(group_ids, stable=True)
    sorted_out = grouped_matmul(x.index_select(0, order), b, group_ids[order])
    out = torch.empty_like(sorted_out)
    out[order] = sorted_out
    return out
