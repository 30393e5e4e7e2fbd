"""Segmented (grouped) matrix multiply shared by the torch reference implementations.

Rows of one group that are consecutive rows of the step (a prefill chunk of one adapter) need no
gather at all: `row_runs` finds them, and callers run each as plain GEMMs on row slices. For
`grouped_matmul`, three ways to the same function, picked per call:
- groups of few rows (at most 8), with at most ~4 padding rows per real one: the rows padded
  into [groups, max rows, K] and one batched GEMM (`PaddedGroups`, which callers may build once
  with `padded_groups` and reuse). On CPU this is 3-6x faster than grouped_mm, which runs one
  small GEMM per group;
- `torch.nn.functional.grouped_mm`: one GEMM per group over jagged row ranges in a single call (on
  CPU too, for fp32/bf16/fp16) as long as every stride is a multiple of 16 bytes;
- where a layout does not qualify, or the group range is mostly empty (each group, empty or not,
  costs grouped_mm a fixed overhead), a per-group loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


# A gathered weight element (segment_matmul's per-row gather and batched GEMV): measured on the
# Intel Xeon VM (2026-12-07), a 64-slot router's [4, 576] per row for 64 decode rows took
# 40 us warm and 100 us with the caches flushed (0.27-0.68 ns an element), against 75 / 161 us
# for one GEMM over the 64-slot range and 237 / 419 us sorted into segments.
_GATHER_ELEMENT_COST = 0.4e-9
_GATHER_FIXED_COST = 10e-6


def gathered_is_cheaper(num_rows: int, num_groups: int, k: int, n: int) -> bool:
    """Whether gathering each row's own [n, k] weights and one batched GEMV (reading num_rows *
    k * n weights, writing them once) is estimated to beat both one GEMM over num_groups groups
    and segmented work on the num_rows wanted products."""
    gathered = _GATHER_FIXED_COST + num_rows * k * n * _GATHER_ELEMENT_COST
    flops = 2 * k * n
    dense = num_rows * num_groups * flops * _DENSE_FLOP_COST
    segmented = _SEGMENTED_FIXED_COST + num_rows * flops * _SEGMENTED_FLOP_COST
    return gathered < min(dense, segmented)


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


@dataclass(frozen=True, slots=True)
class PaddedGroups:
    """Rows sorted by group, laid out as [U, M] for one batched GEMM over U groups: the grid
    group_lo, group_lo + group_step, ... (a grid group with no rows holds M zero rows), or, where
    that grid would be mostly empty, just the groups that have rows (their weights gathered)."""

    group_lo: int
    group_step: int
    num_groups: int  # U
    max_rows: int  # M: most rows of one group
    flat_pos: torch.Tensor  # [P] each row's place in [U * M]
    used_group_ids: torch.Tensor | None = None  # [U] when not the grid

    def pad(self, values: torch.Tensor) -> torch.Tensor:
        """[P, D] rows in group order -> [U, M, D], zero padding."""
        out = values.new_zeros(self.num_groups * self.max_rows, values.shape[1])
        out.index_copy_(0, self.flat_pos, values)
        return out.view(self.num_groups, self.max_rows, values.shape[1])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """[U, M, D] -> [P, D], the inverse of pad."""
        return padded.reshape(-1, padded.shape[-1]).index_select(0, self.flat_pos)

    def groups_of(self, b: torch.Tensor) -> torch.Tensor:
        """[G, ...] -> [U, ...]: the U groups' entries (a view on the grid, else a gather)."""
        if self.used_group_ids is not None:
            return b.index_select(0, self.used_group_ids)
        hi = self.group_lo + (self.num_groups - 1) * self.group_step + 1
        return b[self.group_lo : hi : self.group_step]


def padded_groups(sorted_group_ids: torch.Tensor) -> PaddedGroups | None:
    """The padded layout of rows whose groups are sorted_group_ids ([P] int64, non-decreasing),
    or None where it does not pay for grouped_matmul: a group past _MAX_PADDED_ROWS rows, or
    more than ~4 padding rows per real one."""
    if sorted_group_ids.shape[0] == 0:
        return None
    group_lo = int(sorted_group_ids[0])
    return _padded_from_counts(
        sorted_group_ids, group_lo, torch.bincount(sorted_group_ids - group_lo)
    )


# A run of consecutive rows in one group as plain GEMMs on row slices: no gather, scatter or
# padding, and GEMMs big enough to run near peak. Below this many rows the per-run calls cost
# more than the batched strategies' shared ones.
MIN_RUN_ROWS = 16


@dataclass(frozen=True, slots=True)
class RowRuns:
    """The long runs of a sorted assignment list: assignments p_lo .. p_lo + (row_hi - row_lo)
    - 1 read rows row_lo .. row_hi - 1 in order, all in one group."""

    runs: tuple[tuple[int, int, int, int], ...]  # (row_lo, row_hi, p_lo, group)
    rest: torch.Tensor | None  # [P'] int64 the assignments outside every run (None: no rest)


def row_runs(
    row_ids: torch.Tensor, group_ids: torch.Tensor, min_rows: int = MIN_RUN_ROWS
) -> RowRuns | None:
    """The runs of at least min_rows assignments whose rows are consecutive in one group, or
    None where there are none. row_ids, group_ids [P] int64: runs are neighbours in this order
    (assignments sorted by group, or rows in order with their groups: routing's slot runs)."""
    num_assignments = row_ids.shape[0]
    if num_assignments < min_rows:
        return None
    starts_run = torch.ones(num_assignments, dtype=torch.bool, device=row_ids.device)
    starts_run[1:] = (row_ids[1:] != row_ids[:-1] + 1) | (group_ids[1:] != group_ids[:-1])
    starts = torch.nonzero(starts_run, as_tuple=True)[0]  # [U]
    lengths = torch.diff(starts, append=starts.new_tensor([num_assignments]))  # [U]
    is_long = lengths >= min_rows
    long_starts = starts[is_long]
    if long_starts.shape[0] == 0:
        return None
    runs = tuple(
        (row, row + length, p_lo, group)
        for p_lo, length, row, group in zip(
            long_starts.tolist(),
            lengths[is_long].tolist(),
            row_ids.index_select(0, long_starts).tolist(),
            group_ids.index_select(0, long_starts).tolist(),
            strict=True,
        )
    )
    rest = torch.nonzero(~is_long.repeat_interleave(lengths), as_tuple=True)[0]
    return RowRuns(runs, rest if rest.shape[0] else None)


def places_in_groups(sorted_group_of: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[N] each item's place among the items of its group.

    sorted_group_of [N] int64 local group ids 0..G-1, non-decreasing; counts [G] =
    bincount(sorted_group_of)."""
    starts = counts.cumsum(0) - counts  # [G]
    local = torch.arange(sorted_group_of.shape[0], device=sorted_group_of.device)
    return local - starts.index_select(0, sorted_group_of)


def _padded_from_counts(
    sorted_group_ids: torch.Tensor, group_lo: int, counts: torch.Tensor
) -> PaddedGroups | None:
    """padded_groups, given counts [G] of the rows of groups group_lo, group_lo + 1, ... (up to
    ~4 padding rows per real one, padded rows cost about what the groups' weights do, while
    grouped_mm pays a GEMM call per group)."""
    num_rows = sorted_group_ids.shape[0]
    max_rows = int(counts.max())
    max_padded = 4 * num_rows + 16
    if max_rows > _MAX_PADDED_ROWS:
        return None
    used = torch.nonzero(counts, as_tuple=True)[0]  # [U'] offsets from group_lo, the first 0
    offsets = used.tolist()
    if len(offsets) * max_rows > max_padded:
        return None
    used_counts = counts.index_select(0, used)
    pos = places_in_groups(sorted_group_ids - group_lo, counts)
    # The groups of plain LoRA rows are slot * E: stepping by E skips the other experts, and
    # the weights are a strided view. Routed groups are irregular: gather the used ones.
    step = math.gcd(*offsets) or 1
    num_grid = offsets[-1] // step + 1
    if num_grid * max_rows <= max_padded:
        local_group = (sorted_group_ids - group_lo) // step
        return PaddedGroups(group_lo, step, num_grid, max_rows, local_group * max_rows + pos)
    local_group = torch.repeat_interleave(
        torch.arange(len(offsets), device=sorted_group_ids.device), used_counts
    )
    return PaddedGroups(
        group_lo, 1, len(offsets), max_rows, local_group * max_rows + pos, used + group_lo
    )


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
    counts = torch.bincount(sorted_group_ids - group_lo)  # [hi - lo]
    padded = _padded_from_counts(sorted_group_ids, group_lo, counts)
    if padded is not None:
        return _padded_bmm(a, b, padded)
    group_hi = group_lo + counts.shape[0]
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


def _padded_bmm(a: torch.Tensor, b: torch.Tensor, padded: PaddedGroups) -> torch.Tensor:
    """grouped_matmul as one bmm over the padded layout."""
    num_rows, k = a.shape
    b_groups = padded.groups_of(b).to(a.dtype)  # [U, K, N]
    if padded.num_groups * padded.max_rows == num_rows:  # every group full: a is [U, M, K]
        return torch.bmm(a.reshape(padded.num_groups, padded.max_rows, k), b_groups).reshape(
            num_rows, -1
        )
    return padded.unpad(torch.bmm(padded.pad(a), b_groups))  # [P, N]


def segment_matmul(
    x: torch.Tensor,
    b: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    group_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """out[i] = x[i] @ b[group_ids[i]] for rows in any order.

    x: [N, K]; b: [G, K, N_out]; group_ids: [N] int64; group_range: (min(group_ids), max - min
    + 1) where the caller knows it (saves two reductions). Returns [N, N_out] in x's dtype.
    When rows x groups is small (a router over the step's adapters), one GEMM against the whole
    group range and a gather of each row's own group beat sorting into segments; with few rows
    over a wide range (decode rows over many slots), gathering each row's own weights and a
    batched GEMV beat both.
    """
    num_rows, k, n = x.shape[0], b.shape[1], b.shape[2]
    if num_rows == 0:
        return x.new_zeros((0, n))
    if group_range is None:
        group_lo = int(group_ids.min())
        span = int(group_ids.max()) + 1 - group_lo
    else:
        group_lo, span = group_range
    if gathered_is_cheaper(num_rows, span, k, n):
        # [N, N_out, K]: contiguous rows where b is the transpose of [G, N_out, K] storage
        # (routers); only each row's own group is read.
        weights = b.mT.index_select(0, group_ids).to(x.dtype)
        return torch.bmm(weights, x[:, :, None]).squeeze(-1)
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
