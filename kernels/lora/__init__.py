"""Routed LoRA: segmented shrink and expand over (slot, expert) groups.

One call covers every adapter and expert of a step: the groups of all slots are stacked in one
tensor and each segment of assignments gathers its own A/B pair. Ranks smaller than the stacked
rank are zero-padded, so padded rows add nothing; ``group_ranks`` ([G] int32, each at least the
group's true rank) lets the Triton kernels skip loading them. The ``_pair`` ops run two
projections that share x and segments (gate and up) in one launch.

Segments may be padded (``num_valid`` set): entries from ``num_valid`` on are ignored; shrink
outputs hold zeros there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mixserve.kernels._dispatch import take_compiled_cpu, use_compiled_cpu, use_triton
from mixserve.kernels.assignments import Segments
from mixserve.kernels.lora import joint, reference
from mixserve.kernels.lora.joint import joint_lora_a


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    segments: Segments,
    *,
    gather_rows: bool = True,
    group_ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed shrink.

    Semantics: ``s[p] = x[r(p)] @ lora_a[g(p)]^T`` with ``g(p) = segments.group_ids[p]`` and
    ``r(p) = segments.row_ids[p]`` when ``gather_rows`` else ``p`` (x already holds one row per
    assignment, in segment order).

    Shapes: x [N, K] (or [P, K] when not gathering; may be strided); lora_a [G, R, K] (same dtype
    as x); group_ranks [G] int32 or None. Returns s [P, R] in x's dtype.
    """
    if use_triton(x):
        from mixserve.kernels.lora import triton as device

        return device.lora_shrink(
            x, lora_a, segments, gather_rows=gather_rows, group_ranks=group_ranks
        )
    return reference.lora_shrink(x, lora_a, segments, gather_rows=gather_rows)


def lora_shrink_pair(
    x: torch.Tensor,
    lora_a1: torch.Tensor,
    lora_a2: torch.Tensor,
    segments: Segments,
    *,
    gather_rows: bool = True,
    group_ranks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two routed shrinks of the same rows (gate and up), one launch: x is read once.

    Semantics: ``(lora_shrink(x, lora_a1, ...), lora_shrink(x, lora_a2, ...))``.

    Shapes: as `lora_shrink`, with lora_a1, lora_a2 [G, R, K] each (the same shape for the fused
    launch; otherwise two launches). Returns (s1, s2), [P, R] each.
    """
    if use_triton(x):
        from mixserve.kernels.lora import triton as device

        return device.lora_shrink_pair(
            x, lora_a1, lora_a2, segments, gather_rows=gather_rows, group_ranks=group_ranks
        )
    return (
        reference.lora_shrink(x, lora_a1, segments, gather_rows=gather_rows),
        reference.lora_shrink(x, lora_a2, segments, gather_rows=gather_rows),
    )


def lora_expand(
    s: torch.Tensor,
    lora_b: torch.Tensor,
    segments: Segments,
    coef: torch.Tensor,
    out: torch.Tensor,
    *,
    scatter_rows: bool = True,
    group_ranks: torch.Tensor | None = None,
) -> None:
    """Routed expand with a per-assignment weight epilogue, accumulated in place.

    Semantics: ``out[r(p)] += coef[p] * (s[p] @ lora_b[g(p)]^T)`` with ``r(p) =
    segments.row_ids[p]`` when ``scatter_rows`` else ``p``. Typically ``coef = weight * scale``
    (a routed site) or ``coef = scale`` (per-assignment rows of the MixLoRA FFN).

    Shapes: s [P, R]; lora_b [G, N_out, R] (same dtype as s); coef [P] float32;
    out [N, N_out] (may be a strided view) or [P, N_out] when not scattering;
    group_ranks [G] int32 or None.
    """
    if use_triton(s):
        from mixserve.kernels.lora import triton as device

        device.lora_expand(
            s, lora_b, segments, coef, out, scatter_rows=scatter_rows, group_ranks=group_ranks
        )
        return
    reference.lora_expand(s, lora_b, segments, coef, out, scatter_rows=scatter_rows)


def lora_expand_pair(
    s1: torch.Tensor,
    s2: torch.Tensor,
    lora_b1: torch.Tensor,
    lora_b2: torch.Tensor,
    segments: Segments,
    coef1: torch.Tensor,
    coef2: torch.Tensor,
    out1: torch.Tensor,
    out2: torch.Tensor,
    *,
    scatter_rows: bool = True,
    group_ranks: torch.Tensor | None = None,
) -> None:
    """Two routed expands over the same segments (gate and up), one launch.

    Semantics: ``lora_expand(s1, lora_b1, segments, coef1, out1, ...)`` then the same with the
    second operands; out1 and out2 must not overlap.

    Shapes: as `lora_expand` for each (N_out may differ; the same R and dtype for the fused
    launch, otherwise two launches).
    """
    if use_triton(s1):
        from mixserve.kernels.lora import triton as device

        device.lora_expand_pair(
            s1, s2, lora_b1, lora_b2, segments, coef1, coef2, out1, out2,
            scatter_rows=scatter_rows, group_ranks=group_ranks,
        )  # fmt: skip
        return
    reference.lora_expand(s1, lora_b1, segments, coef1, out1, scatter_rows=scatter_rows)
    reference.lora_expand(s2, lora_b2, segments, coef2, out2, scatter_rows=scatter_rows)


def lora_apply(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    segments: Segments,
    coef: torch.Tensor | None,
    out: torch.Tensor,
    *,
    group_ranks: torch.Tensor | None = None,
    group_scale: torch.Tensor | None = None,
) -> None:
    """A routed site's whole delta, accumulated in place.

    Semantics: ``out[r(p)] += coef[p] * (x[r(p)] @ lora_a[g(p)]^T) @ lora_b[g(p)]^T``, i.e.
    `lora_shrink` (gathering rows) then `lora_expand` (scattering rows); the CPU reference may
    instead run the step's groups densely when that is cheaper. With coef None,
    ``coef[p] = segments.weights[p] * group_scale[g(p)]`` (a site's per-group LoRA scale): the
    CPU reference then scales whole groups at once where it pads them.

    Shapes: x [N, K]; lora_a [G, R, K]; lora_b [G, N_out, R] (same dtype as x); coef [P] float32
    or None; group_scale [G] float32 (needed when coef is None); out [N, N_out] (may be a
    strided view); group_ranks [G] int32 or None.
    """
    if use_triton(x):
        from mixserve.kernels.lora import triton as device

        coef = reference.assignment_coef(segments, coef, group_scale)
        s = device.lora_shrink(x, lora_a, segments, gather_rows=True, group_ranks=group_ranks)
        device.lora_expand(
            s, lora_b, segments, coef, out, scatter_rows=True, group_ranks=group_ranks
        )
        return
    if use_compiled_cpu(x):
        scales = None if group_scale is None else [group_scale]
        if _compiled_sites(x, lora_a, [lora_b], segments, coef, out, scales):
            return
    reference.lora_apply(x, lora_a, lora_b, segments, coef, out, group_scale)


def lora_apply_joint(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    segments: Segments,
    out: torch.Tensor,
    *,
    group_scales: Sequence[torch.Tensor],
    group_ranks: Sequence[torch.Tensor] | None = None,
) -> None:
    """n plain sites (group_scale, no per-call coef) that read the same rows with the same
    segments (q/k/v, gate/up of plain LoRA adapters), accumulated in place into their outputs
    side by side.

    Semantics: for each site i, ``lora_apply(x, lora_a[:, i R : (i + 1) R], lora_bs[i],
    segments, None, out[:, c_i : c_i + out_i], group_scale=group_scales[i])`` where c_i is the
    sum of the earlier sites' widths. The CPU reference gathers and shrinks x once for all n.

    Shapes: x [N, K]; lora_a [G, n R, K] (`joint_lora_a` of the n sites' A); lora_bs n x
    [G, out_i, R]; group_scales n x [G] float32; out [N, sum out_i]; group_ranks n x [G] int32
    or None.
    """
    if use_triton(x):
        parts = reference.joint_parts(lora_a, lora_bs, out)
        for i, (part_a, lora_b, part_out) in enumerate(parts):
            ranks = None if group_ranks is None else group_ranks[i]
            lora_apply(
                x,
                part_a,
                lora_b,
                segments,
                None,
                part_out,
                group_ranks=ranks,
                group_scale=group_scales[i],
            )
        return
    if use_compiled_cpu(x):
        if _compiled_sites(x, lora_a, lora_bs, segments, None, out, group_scales):
            return
    joint.lora_apply_joint(x, lora_a, lora_bs, segments, out, group_scales)


def _compiled_sites(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    segments: Segments,
    coef: torch.Tensor | None,
    out: torch.Tensor,
    group_scales: Sequence[torch.Tensor] | None,
) -> bool:
    """Runs n sites through the compiled CPU kernel where it is built and takes the call
    (coef [P], or None with group_scales n x [G]); False: the caller runs the reference."""
    from mixserve.kernels.lora import cpu

    if not take_compiled_cpu(cpu.module() is not None, cpu.why_not(x, lora_a, lora_bs, out)):
        return False
    segments = segments.trimmed()
    count = segments.num_assignments
    if count:
        scales = None if group_scales is None else torch.stack(list(group_scales), 1)  # [G, n]
        site_coef = reference.assignment_coef(
            segments, None if coef is None else coef[:count, None], scales
        )  # [P, n]
        cpu.lora_apply_sites(x, lora_a, lora_bs, segments, site_coef, out)
    return True


__all__ = [
    "joint_lora_a",
    "lora_apply",
    "lora_apply_joint",
    "lora_expand",
    "lora_expand_pair",
    "lora_shrink",
    "lora_shrink_pair",
]
