"""Pure-torch routed LoRA: prefill chunks as GEMMs on row slices, other rows as weighted bags;
lora_shrink / lora_expand, the separate ops, as grouped GEMMs and rank-row bags.

Padded Segments (from a device builder) are trimmed to their valid prefix first (a host sync:
fine here, the reference is the CPU path). Ranks are not masked: padded A rows / B columns are
zero, so `group_ranks` changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from mixserve.kernels._grouped import (
    PaddedGroups,
    RowRuns,
    grouped_matmul,
    padded_groups,
    row_runs,
)
from mixserve.kernels._rank_bags import RankBags, bag_expand, bag_shrink
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
    # Rank-row bags (no GEMM call per group): a view on the pool's B, a copy for other layouts.
    # Their indices live in the Segments' memo: the pair op expands the same segments twice.
    delta = _scaled_expand(s[:count], coef[:count], lora_b, _rank_bags(segments, lora_b))
    if scatter_rows:
        _add_to_rows(out, segments, delta)
    else:
        out[:count] += delta.to(out.dtype)


def _rank_bags(segments: Segments, weights: torch.Tensor) -> RankBags:
    """The segments' bag indices over weights' [G, ...] groups, built once per Segments."""
    return segments.memoised("rank_bags", lambda: RankBags(segments.group_ids, weights.shape[0]))


def _scaled_expand(
    s: torch.Tensor, coef: torch.Tensor, lora_b: torch.Tensor, bags: RankBags
) -> torch.Tensor:
    """[P, N_out]: coef[p] * B_g(p) s[p] as rank-row bags; s [P, R], coef [P]."""
    rank = lora_b.shape[2]
    scaled = s * coef.to(s.dtype)[:, None]
    return bag_expand(scaled, lora_b, bags.ids(rank), bags.offsets(rank))


def _add_to_rows(out: torch.Tensor, segments: Segments, delta: torch.Tensor) -> None:
    """out[row_ids[p]] += delta[p] for the (trimmed) segments' assignments. Where they are
    every row of out once (a decode step's plain-LoRA rows), the deltas are gathered back into
    row order and added in one op: index_add_ adds row by row (66 us for 64 rows of 576 into
    a column slice, against 6 for add_)."""
    delta = delta if delta.dtype == out.dtype else delta.to(out.dtype)
    row_order = _every_row_order(segments, out.shape[0])
    if row_order is None:
        out.index_add_(0, segments.row_ids, delta)
    else:
        out.add_(delta.index_select(0, row_order))


# The padded strategy while its layout has at most this many places per assignment: the
# padding's gathers and GEMM rows cost less than bags' per-assignment weight reads only while
# there is little of it. On the Intel Xeon VM (2026-12-06, q/k/v + o of 30 layers, 64 decode
# rows over 48 adapters): padded at 1.5 places a row took 0.93x the bags' time, at 2.25 0.94x,
# at 3 1.02x, at ~4 (rows drawn at random) 1.24-1.27x, and a popular adapter's padded levels
# (zipf) 2.0-2.3x (bench/RESULTS.md, session 27).
MAX_PADDED_PLACES_PER_ROW = 2.5


def _padded_layout(
    segments: Segments,
) -> tuple[PaddedGroups, torch.Tensor, torch.Tensor] | None:
    """padded_groups of the (trimmed) segments where it has at most MAX_PADDED_PLACES_PER_ROW
    places per assignment; for each of its U * M places, the row it reads and adds to; the
    weights padded to [U, M, 1]. Built once per Segments. A padding place takes the first
    assignment's row: its coef is 0, so it adds zeros to that row (non-finite x there already
    makes the row's own delta non-finite)."""

    def build() -> tuple[PaddedGroups, torch.Tensor, torch.Tensor] | None:
        padded = padded_groups(segments.group_ids)
        count = segments.num_assignments
        if (
            padded is None
            or padded.num_groups * padded.max_rows > MAX_PADDED_PLACES_PER_ROW * count
        ):
            return None
        place_rows = segments.row_ids[:1].repeat(padded.num_groups * padded.max_rows)
        place_rows.index_copy_(0, padded.flat_pos, segments.row_ids)
        return padded, place_rows, padded.pad(segments.weights[:, None])

    return segments.memoised("padded", build)


def joint_parts(
    lora_a: torch.Tensor, lora_bs: Sequence[torch.Tensor], out: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each of n sites applied together: (its A [G, R, in] of the joint [G, n R, in], its B, its
    column slice of out [N, sum out_i])."""
    rank, col = lora_bs[0].shape[2], 0
    for i, lora_b in enumerate(lora_bs):
        width = lora_b.shape[1]
        yield lora_a[:, i * rank : (i + 1) * rank], lora_b, out[:, col : col + width]
        col += width


def _apply_padded(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    padded: PaddedGroups,
    place_rows: torch.Tensor,
    place_coef: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out[place_rows] += place_coef * (x[place_rows] A^T) B^T over the padded layout, for n
    sites at once (x gathered and shrunk once); place_coef [U, M, n] float32, 0 at padding
    places."""
    num_sites, rank = len(lora_bs), lora_bs[0].shape[2]
    shape = (padded.num_groups, padded.max_rows, -1)
    rows = x.index_select(0, place_rows).view(shape)  # [U, M, in]
    s = torch.bmm(rows, padded.groups_of(lora_a).mT)  # [U, M, n R]
    if num_sites == 1:  # no split: fewer ops on the decode step's hot path
        s.mul_(place_coef if place_coef.dtype == s.dtype else place_coef.to(s.dtype))
        delta = torch.bmm(s, padded.groups_of(lora_bs[0]).mT)  # [U, M, out]
    else:
        s = s.view(*s.shape[:2], num_sites, rank).mul_(place_coef[..., None].to(s.dtype))
        delta = torch.cat(
            [torch.bmm(s[:, :, i], padded.groups_of(b).mT) for i, b in enumerate(lora_bs)], dim=2
        )  # [U, M, sum out_i]
    delta = delta.view(place_rows.shape[0], -1)  # [U * M, sum out_i]
    out.index_add_(0, place_rows, delta if delta.dtype == out.dtype else delta.to(out.dtype))


def _runs_layout(segments: Segments) -> tuple[RowRuns, Segments | None] | None:
    """row_runs of the (trimmed) segments and the Segments of the rest, built once per
    Segments (so the rest's own layouts are too)."""

    def build() -> tuple[RowRuns, Segments | None] | None:
        runs = row_runs(segments.row_ids, segments.group_ids)
        if runs is None:
            return None
        return runs, None if runs.rest is None else segments.subset(runs.rest)

    return segments.memoised("runs", build)


def _apply_runs(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    runs: RowRuns,
    coef: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """Each run as plain GEMMs on its row slice, one shrink for the n sites: out[rows] +=
    (coef * x[rows] A^T) B^T; coef [P, n]."""
    num_sites, rank = len(lora_bs), lora_bs[0].shape[2]
    for row_lo, row_hi, p_lo, group in runs.runs:
        s = x[row_lo:row_hi] @ lora_a[group].T  # [rows, n R]
        run_coef = coef[p_lo : p_lo + row_hi - row_lo, :, None].to(s.dtype)  # [rows, n, 1]
        s = s.view(row_hi - row_lo, num_sites, rank).mul_(run_coef)
        for i, (_, lora_b, part_out) in enumerate(joint_parts(lora_a, lora_bs, out)):
            target = part_out[row_lo:row_hi]
            if out.dtype == s.dtype:
                target.addmm_(s[:, i], lora_b[group].T)
            else:
                target += (s[:, i] @ lora_b[group].T).to(out.dtype)


def assignment_coef(
    segments: Segments, coef: torch.Tensor | None, group_scale: torch.Tensor | None
) -> torch.Tensor:
    """lora_apply's per-assignment coef: as given, else weights * group_scale[group_ids]:
    group_scale [G] gives [P] (one site), [G, n] gives [P, n] (n sites applied together)."""
    if coef is not None:
        return coef
    if group_scale is None:
        raise ValueError("lora_apply needs coef or group_scale")
    weights = segments.weights if group_scale.dim() == 1 else segments.weights[:, None]
    return weights * group_scale.index_select(0, segments.group_ids)


def lora_apply(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    segments: Segments,
    coef: torch.Tensor | None,
    out: torch.Tensor,
    group_scale: torch.Tensor | None = None,
) -> None:
    """Shrink then expand, by three equivalent strategies. coef [P], or None with group_scale
    [G]: coef = segments.weights * group_scale[group_ids].

    - runs: assignments whose rows are consecutive rows of one group (prefill chunks), at least
      MIN_RUN_ROWS of them, as plain GEMMs on row slices; the rest as one of:
    - padded, where the groups have few and even rows (decode steps, an adapter or two rows
      each): rows padded into [groups, max rows] and two batched GEMMs, the layout built once
      per Segments (the plain-LoRA rows of a step pay for it once, not at every layer and site);
    - bags otherwise (a popular adapter's rows beside single ones, uneven groups, groups of many
      rows that are no runs): x gathered and shrunk as input-row bags, expanded as rank-row bags
      (kernels/_rank_bags.py), one call each whatever the number of groups. On CPU they beat
      the earlier per-site segmented and dense strategies and the padded levels at every shape
      measured (bench/RESULTS.md, session 27).
    """
    site_coef = None if coef is None else coef[:, None]
    site_scales = None if group_scale is None else [group_scale]
    lora_apply_sites(x, lora_a, [lora_b], segments, site_coef, out, site_scales)


def lora_apply_sites(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    segments: Segments,
    coef: torch.Tensor | None,
    out: torch.Tensor,
    group_scales: Sequence[torch.Tensor] | None,
) -> None:
    """lora_apply for n sites on the same segments whose outputs lie side by side in out
    [N, sum out_i]: lora_a [G, n R, in] (one site's A, or joint_lora_a of n), lora_bs n x
    [G, out_i, R]; coef [P, n], or None with group_scales n x [G]. Every strategy shrinks x
    once for all n."""
    segments = segments.trimmed()
    count = segments.num_assignments
    if count == 0:
        return
    if coef is None and group_scales is None:
        raise ValueError("lora_apply needs coef or group_scale")
    scales = None
    if group_scales is not None:  # [G, n]
        scales = group_scales[0][:, None] if len(lora_bs) == 1 else torch.stack(group_scales, 1)
    if coef is not None:
        coef = coef[:count]  # [P, n]; a padded coef: its valid prefix
    runs = _runs_layout(segments)
    if runs is not None:
        coef = assignment_coef(segments, coef, scales)
        _apply_runs(x, lora_a, lora_bs, runs[0], coef, out)
        rest, rest_ids = runs[1], runs[0].rest
        if rest is None or rest_ids is None:
            return
        segments, coef = rest, coef.index_select(0, rest_ids)
    _apply_rest(x, lora_a, lora_bs, segments, coef, scales, out)


def _apply_rest(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    segments: Segments,
    coef: torch.Tensor | None,
    scales: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """lora_apply_sites on segments without row runs: padded where its layout is tight, else
    bags. coef [P, n], or None with scales [G, n] (the padded layout then scales whole
    groups)."""
    layout = _padded_layout(segments)
    if layout is None:
        _apply_bags(x, lora_a, lora_bs, segments, assignment_coef(segments, coef, scales), out)
        return
    padded, place_rows, padded_weights = layout
    if coef is None:
        assert scales is not None
        place_coef = padded_weights * padded.groups_of(scales).unsqueeze(1)  # [U, M, n]
    else:
        place_coef = padded.pad(coef)  # [U, M, n], padding places: 0
    _apply_padded(x, lora_a, lora_bs, padded, place_rows, place_coef, out)


def _apply_bags(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    segments: Segments,
    coef: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out[rows] += (coef * A x[rows]) B^T for n sites at once as weighted bags: x gathered and
    shrunk once (input-row bags over A's [.., in, n R] storage), each site expanded (rank-row
    bags), and the n deltas added to out [N, sum out_i] in one op; coef [P, n]. No call per
    group, and no padding: each assignment reads its group's weights (from cache when the
    group's assignments follow each other, as they do sorted by group); the deltas reach
    their rows as `_add_to_rows` adds them. The bag indices live in the Segments' memo, so a
    step's plain-LoRA rows build them once for every layer and site."""
    rank = lora_bs[0].shape[2]
    bags = _rank_bags(segments, lora_a)
    shrunk = bag_shrink(x.index_select(0, segments.row_ids), lora_a, bags)  # [P, n R]
    deltas = [
        _scaled_expand(shrunk[:, i * rank : (i + 1) * rank], coef[:, i], lora_b, bags)
        for i, lora_b in enumerate(lora_bs)
    ]  # n x [P, out_i]
    _add_to_rows(out, segments, deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=1))


def _every_row_order(segments: Segments, num_rows: int) -> torch.Tensor | None:
    """Where the (trimmed) segments hold each of the num_rows rows exactly once: the
    assignment of each row ([N], the inverse of row_ids). Built once per Segments."""

    def build() -> torch.Tensor | None:
        row_ids = segments.row_ids
        if row_ids.shape[0] != num_rows:
            return None
        rows_sorted, order = torch.sort(row_ids)
        if not torch.equal(rows_sorted, torch.arange(num_rows, device=row_ids.device)):
            return None
        return order

    return segments.memoised(f"every_row_order:{num_rows}", build)
