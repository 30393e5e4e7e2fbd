"""Pure-torch routed LoRA on top of one segmented GEMM per call.

Padded Segments (from a device builder) are trimmed to their valid prefix first (a host sync:
fine here, the reference is the CPU path). Ranks are not masked: padded A rows / B columns are
zero, so `group_ranks` changes nothing.
"""

from __future__ import annotations

import torch

from mixserve.kernels._grouped import grouped_matmul
from mixserve.kernels.assignments.segments import Segments


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    segments: Segments,
    *,
    gather_rows: bool,
) -> torch.Tensor:
    padded_rows = segments.row_ids.shape[0]
    segments = segments.trimmed()
    count = segments.row_ids.shape[0]
    rows = x.index_select(0, segments.row_ids) if gather_rows else x[:count]
    s = grouped_matmul(rows, lora_a.transpose(1, 2), segments.group_ids)  # [count, R]
    if count == padded_rows:
        return s
    out = s.new_zeros(padded_rows, s.shape[1])  # padding rows are zero, as on the device
    out[:count] = s
    return out


def lora_expand(
    s: torch.Tensor,
    lora_b: torch.Tensor,
    segments: Segments,
    coef: torch.Tensor,
    out: torch.Tensor,
    *,
    scatter_rows: bool,
) -> None:
    segments = segments.trimmed()
    count = segments.num_assignments
    if count == 0:
        return
    scaled = s[:count] * coef[:count].to(s.dtype)[:, None]
    delta = grouped_matmul(scaled, lora_b.transpose(1, 2), segments.group_ids)  # [P, N_out]
    if scatter_rows:
        out.index_add_(0, segments.row_ids, delta.to(out.dtype))
    else:
        out[:count] += delta.to(out.dtype)
