"""Segmented (grouped) matrix multiply shared by the torch reference implementations.

`torch.nn.functional.grouped_mm` runs one GEMM per group over jagged row ranges in a single call
(on CPU too, for fp32/bf16/fp16) as long as every stride is a multiple of 16 bytes. Where a layout
does not qualify, or where the group range is mostly empty (each group, empty or not, costs a fixed
overhead), a per-group loop computes the same function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


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


def segment_matmul(x: torch.Tensor, b: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """out[i] = x[i] @ b[group_ids[i]] for rows in any order.

    x: [N, K]; b: [G, K, N_out]; group_ids: [N] int64. Returns [N, N_out] in x's dtype.
    """
    order = torch.argsort(group_ids, stable=True)
    sorted_out = grouped_matmul(x.index_select(0, order), b, group_ids[order])
    out = torch.empty_like(sorted_out)
    out[order] = sorted_out
    return out
