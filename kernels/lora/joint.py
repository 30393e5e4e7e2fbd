"""Pure-torch joint sites: n plain LoRA sites that read the same rows with the same segments
(q/k/v of a fused qkv projection, gate/up) and whose A the pool keeps in one [.., in, n, R]
storage, so x is gathered and shrunk once for all n (kernels.lora.lora_apply_joint)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from mixserve.kernels.assignments.segments import Segments
from mixserve.kernels.lora.reference import _padded_layout, _runs_layout, lora_apply


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


def joint_parts(
    lora_a: torch.Tensor, lora_bs: Sequence[torch.Tensor], out: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each site of a joint call: (its A [G, R, in] of the joint [G, n R, in], its B, its column
    slice of out [N, sum out_i])."""
    rank, col = lora_bs[0].shape[2], 0
    for i, lora_b in enumerate(lora_bs):
        width = lora_b.shape[1]
        yield lora_a[:, i * rank : (i + 1) * rank], lora_b, out[:, col : col + width]
        col += width


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
    the n outputs side by side. Equals lora_apply per site on out's column slices; where the
    assignments are row runs or padded groups, x is gathered and shrunk once for all n."""
    num_sites, rank = len(lora_bs), lora_bs[0].shape[2]
    if lora_a.shape[1] != num_sites * rank or out.shape[1] != sum(b.shape[1] for b in lora_bs):
        raise ValueError(
            f"joint sites: A {tuple(lora_a.shape)} and out {tuple(out.shape)} do not match "
            f"{num_sites} sites of rank {rank} and widths {[b.shape[1] for b in lora_bs]}"
        )
    segments = segments.trimmed()
    if segments.num_assignments == 0:
        return
    scales = torch.stack(list(group_scales), dim=1)  # [G, n]
    runs = _runs_layout(segments)
    rest: Segments | None = segments
    coef = None
    if runs is not None:
        coef = segments.weights[:, None] * scales.index_select(0, segments.group_ids)  # [P, n]
        for row_lo, row_hi, p_lo, group in runs[0].runs:
            s = x[row_lo:row_hi] @ lora_a[group].T  # [rows, n * R]
            part_coef = coef[p_lo : p_lo + row_hi - row_lo].to(s.dtype)  # [rows, n]
            s = s.view(row_hi - row_lo, num_sites, rank).mul_(part_coef[:, :, None])
            for i, (_, lora_b, part_out) in enumerate(joint_parts(lora_a, lora_bs, out)):
                target = part_out[row_lo:row_hi]
                if out.dtype == s.dtype:
                    target.addmm_(s[:, i], lora_b[group].T)
                else:
                    target += (s[:, i] @ lora_b[group].T).to(out.dtype)
        rest = runs[1]
        if rest is None:
            return
        coef = coef.index_select(0, runs[0].rest)
    layout = _padded_layout(rest)
    if layout is None:  # per site, by lora_apply's other strategies
        for i, (part_a, lora_b, part_out) in enumerate(joint_parts(lora_a, lora_bs, out)):
            part_coef = None if coef is None else coef[:, i].contiguous()
            scale = group_scales[i] if part_coef is None else None
            lora_apply(x, part_a, lora_b, rest, part_coef, part_out, scale)
        return
    padded, place_rows, padded_weights = layout
    if coef is None:
        place_coef = padded_weights * padded.groups_of(scales)[:, None, :]  # [U, M, n]
    else:
        place_coef = padded.pad(coef)  # [U, M, n]
    shape = (padded.num_groups, padded.max_rows, -1)
    rows = x.index_select(0, place_rows).view(shape)  # [U, M, in]
    s = torch.bmm(rows, padded.groups_of(lora_a).mT)  # [U, M, n * R]
    s = s.view(*s.shape[:2], num_sites, rank).mul_(place_coef[..., None].to(s.dtype))
    deltas = [
        torch.bmm(s[:, :, i], padded.groups_of(lora_b).mT) for i, lora_b in enumerate(lora_bs)
    ]  # n x [U, M, out_i]
    delta = torch.cat(deltas, dim=2).view(place_rows.shape[0], -1)  # [U * M, sum out_i]
    out.index_add_(0, place_rows, delta if delta.dtype == out.dtype else delta.to(out.dtype))
