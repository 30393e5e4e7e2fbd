"""Routed LoRA: segmented shrink and expand over (slot, expert) groups.

One call covers every adapter and expert of a step: the groups of all slots are stacked in one
tensor and each segment of assignments gathers its own A/B pair. Ranks smaller than the stacked
rank are zero-padded, so padded rows add nothing.
"""

from __future__ import annotations

import torch

from mixserve.kernels.assignments import Segments
from mixserve.kernels.lora import reference


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    segments: Segments,
    *,
    gather_rows: bool = True,
) -> torch.Tensor:
    """Routed shrink.

    Semantics: ``s[p] = x[r(p)] @ lora_a[g(p)]^T`` with ``g(p) = segments.group_ids[p]`` and
    ``r(p) = segments.row_ids[p]`` when ``gather_rows`` else ``p`` (x already holds one row per
    assignment, in segment order).

    Shapes: x [N, K]; lora_a [G, R, K] (same dtype as x); returns s [P, R] in x's dtype.
    """
    return reference.lora_shrink(x, lora_a, segments, gather_rows=gather_rows)


def lora_expand(
    s: torch.Tensor,
    lora_b: torch.Tensor,
    segments: Segments,
    coef: torch.Tensor,
    out: torch.Tensor,
    *,
    scatter_rows: bool = True,
) -> None:
    """Routed expand with a per-assignment weight epilogue, accumulated in place.

    Semantics: ``out[r(p)] += coef[p] * (s[p] @ lora_b[g(p)]^T)`` with ``r(p) =
    segments.row_ids[p]`` when ``scatter_rows`` else ``p``. Typically ``coef = weight * scale``
    (a routed site) or ``coef = scale`` (per-assignment rows of the MixLoRA FFN).

    Shapes: s [P, R]; lora_b [G, N_out, R] (same dtype as s); coef [P] float32;
    out [N, N_out] (may be a strided view) or [P, N_out] when not scattering.
    """
    reference.lora_expand(s, lora_b, segments, coef, out, scatter_rows=scatter_rows)


__all__ = ["lora_expand", "lora_shrink"]
