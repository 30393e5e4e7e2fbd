"""Pure-torch joint sites: n plain LoRA sites that read the same rows with the same segments
(q/k/v of a fused qkv projection, gate/up) and whose A the pool keeps in one [.., in, n, R]
storage, so x is gathered and shrunk once for all n (kernels.lora.lora_apply_joint)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mixserve.kernels.assignments.segments import Segments
from mixserve.kernels.lora.reference import lora_apply_sites


def joint_lora_a(*parts: torch.Tensor) -> torch.Tensor | None:
    """[G, n * R, in]: n projections' A (each [..., R, in], G the product of the leading dims)
    as one view, where they are the n consecutive R-wide slices of one [..., in, n, R] storage
    (the adapter pool's, for gate/up and q/k/v: their rows are shared, so one shrink reads x
    once for all n); else None."""
    first = parts[0]
    *lead, rank, in_features = first.shape
    width = len(parts) * rank
    strides = [1, width]  # R, in
    step = in_features * width
    for size in reversed(lead):
        strides.insert(0, step)
        step *= size
    size = first.element_size()
    for i, part in enumerate(parts):
        if (
            part.shape != first.shape
            or part.dtype != first.dtype
            or list(part.stride()) != strides
            or part.data_ptr() - first.data_ptr() != i * rank * size
        ):
            return None
    num_groups = step // (in_features * width)
    return first.as_strided(
        (num_groups, width, in_features), (in_features * width, 1, width), first.storage_offset()
    )


def lora_apply_joint(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    segments: Segments,
    out: torch.Tensor,
    group_scales: Sequence[torch.Tensor],
) -> None:
    """n plain sites on the same rows and groups at once (q/k/v, gate/up): lora_a [G, n * R, in]
    (joint_lora_a), lora_bs n x [G, out_i, R], group_scales n x [G]; out [N, sum out_i] holds
    the n outputs side by side. lora_apply's strategies for n sites (reference.lora_apply_sites):
    where the assignments are row runs or padded groups, x is gathered and shrunk once."""
    num_sites, rank = len(lora_bs), lora_bs[0].shape[2]
    if lora_a.shape[1] != num_sites * rank or out.shape[1] != sum(b.shape[1] for b in lora_bs):
        raise ValueError(
            f"joint sites: A {tuple(lora_a.shape)} and out {tuple(out.shape)} do not match "
            f"{num_sites} sites of rank {rank} and widths {[b.shape[1] for b in lora_bs]}"
        )
    lora_apply_sites(x, lora_a, lora_bs, segments, None, out, group_scales)
