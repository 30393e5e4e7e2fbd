"""Pure-torch routed LoRA on top of one segmented GEMM per call."""

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
    rows = x.index_select(0, segments.row_ids) if gather_rows else x
    return grouped_matmul(rows, lora_a.transpose(1, 2), segments.group_ids)


def lora_expand(
    s: torch.Tensor,
    lora_b: torch.Tensor,
    segments: Segments,
    coef: torch.Tensor,
    out: torch.Tensor,
    *,
    scatter_rows: bool,
) -> None:
    if segments.num_assignments == 0:
        return
    scaled = s * coef.to(s.dtype)[:, None]
    delta = grouped_matmul(scaled, lora_b.transpose(1, 2), segments.group_ids)  # [P, N_out]
    if scatter_rows:
        out.index_add_(0, segments.row_ids, delta.to(out.dtype))
    else:
        out += delta.to(out.dtype)
