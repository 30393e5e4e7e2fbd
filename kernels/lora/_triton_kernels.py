"""Triton kernels of the routed LoRA ops (launched by `mixserve.kernels.lora.triton`).

Each program owns BLOCK_M consecutive assignments, sorted by group, and loops over the distinct
groups present in its tile, masking the other rows, so each `tl.dot` reads one A or B matrix.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Larger than any group id; marks "no group left" in the per-tile group loop.
_NO_GROUP: tl.constexpr = tl.constexpr(2**62)


@triton.jit
def _tile_assignments(
    group_ptr, num_valid_ptr, num_rows, BLOCK_M: tl.constexpr, HAS_NUM_VALID: tl.constexpr
):
    """(offsets [BM] int64, valid [BM], groups [BM] int64) of this program's assignments."""
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = offs_m < num_rows
    if HAS_NUM_VALID:
        valid = valid & (offs_m < tl.load(num_valid_ptr))
    groups = tl.load(group_ptr + offs_m, mask=valid, other=0)
    return offs_m, valid, groups


@triton.jit
def _next_group(groups, valid, after):
    """Smallest group id in the tile above `after` (_NO_GROUP when none)."""
    return tl.min(tl.where(valid & (groups > after), groups, _NO_GROUP), axis=0)


@triton.jit
def shrink_kernel(
    x_ptr, a1_ptr, a2_ptr, s1_ptr, s2_ptr,
    row_ptr, group_ptr, num_valid_ptr, ranks_ptr,
    num_rows, K, R, k_per_split,
    stride_xm, stride_xk,
    stride_a1g, stride_a1r, stride_a1k,
    stride_a2g, stride_a2r, stride_a2k,
    stride_s1m, stride_s1r, stride_s2m, stride_s2r,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    GATHER: tl.constexpr, PAIR: tl.constexpr, HAS_NUM_VALID: tl.constexpr,
    HAS_RANKS: tl.constexpr, ATOMIC_OUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """s[p, r] = x[row(p)] . A[g(p), r]. program_id(2) takes one K slice; with several slices
    (ATOMIC_OUT) partial sums are added into float32 outputs zeroed by the caller."""
    offs_m, valid, groups = _tile_assignments(
        group_ptr, num_valid_ptr, num_rows, BLOCK_M, HAS_NUM_VALID
    )
    k_start = tl.program_id(2) * k_per_split  # k_per_split: a multiple of BLOCK_K
    if GATHER:
        rows = tl.load(row_ptr + offs_m, mask=valid, other=0)
    else:
        rows = offs_m
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # [BM, BR]
    acc2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)

    group = _next_group(groups, valid, -1)
    while group < _NO_GROUP:
        in_group = valid & (groups == group)
        r_mask = offs_r < R
        if HAS_RANKS:
            r_mask = r_mask & (offs_r < tl.load(ranks_ptr + group))
        for k_step in range(0, k_per_split, BLOCK_K):
            k0 = k_start + k_step
            k_mask = (k0 + offs_k) < K
            x_tile = tl.load(
                x_ptr + rows[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                mask=in_group[:, None] & k_mask[None, :],
                other=0.0,
            )  # [BM, BK]; rows of other groups read as zero
            a_mask = k_mask[:, None] & r_mask[None, :]
            a_tile = tl.load(
                a1_ptr
                + group * stride_a1g
                + offs_r[None, :] * stride_a1r
                + (k0 + offs_k)[:, None] * stride_a1k,
                mask=a_mask,
                other=0.0,
            )  # [BK, BR] = A[g]^T tile
            x_tile = x_tile.to(DOT_DTYPE)
            acc1 = tl.dot(x_tile, a_tile.to(DOT_DTYPE), acc1, input_precision=DOT_PRECISION)
            if PAIR:  # the same x tile feeds the second projection (gate+up)
                a_tile = tl.load(
                    a2_ptr
                    + group * stride_a2g
                    + offs_r[None, :] * stride_a2r
                    + (k0 + offs_k)[:, None] * stride_a2k,
                    mask=a_mask,
                    other=0.0,
                )
                acc2 = tl.dot(x_tile, a_tile.to(DOT_DTYPE), acc2, input_precision=DOT_PRECISION)
        group = _next_group(groups, valid, group)

    # Every row of the tile is stored: padding and masked rank columns hold zeros.
    out_mask = (offs_m < num_rows)[:, None] & (offs_r < R)[None, :]
    s1 = s1_ptr + offs_m[:, None] * stride_s1m + offs_r[None, :] * stride_s1r
    s2 = s2_ptr + offs_m[:, None] * stride_s2m + offs_r[None, :] * stride_s2r
    if ATOMIC_OUT:
        tl.atomic_add(s1, acc1, mask=out_mask, sem="relaxed")
        if PAIR:
            tl.atomic_add(s2, acc2, mask=out_mask, sem="relaxed")
    else:
        tl.store(s1, acc1.to(s1_ptr.dtype.element_ty), mask=out_mask)
        if PAIR:
            tl.store(s2, acc2.to(s2_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _expand_tile(
    s_ptr, b_ptr, coef_ptr, out_ptr, row_ptr, ranks_ptr,
    offs_m, valid, groups, tile_n, N_out, R,
    stride_sm, stride_sr, stride_bg, stride_bn, stride_br, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    SCATTER: tl.constexpr, HAS_RANKS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N_out
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BM, BN]

    group = _next_group(groups, valid, -1)
    while group < _NO_GROUP:
        in_group = valid & (groups == group)
        for r0 in range(0, R, BLOCK_R):
            r_mask = (r0 + offs_r) < R
            if HAS_RANKS:
                r_mask = r_mask & ((r0 + offs_r) < tl.load(ranks_ptr + group))
            s_tile = tl.load(
                s_ptr + offs_m[:, None] * stride_sm + (r0 + offs_r)[None, :] * stride_sr,
                mask=in_group[:, None] & r_mask[None, :],
                other=0.0,
            )  # [BM, BR]; rows of other groups read as zero, so they add nothing
            b_tile = tl.load(
                b_ptr
                + group * stride_bg
                + offs_n[None, :] * stride_bn
                + (r0 + offs_r)[:, None] * stride_br,
                mask=r_mask[:, None] & n_mask[None, :],
                other=0.0,
            )  # [BR, BN] = B[g]^T tile
            acc = tl.dot(
                s_tile.to(DOT_DTYPE), b_tile.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION
            )
        group = _next_group(groups, valid, group)

    coef = tl.load(coef_ptr + offs_m, mask=valid, other=0.0)  # [BM] float32 epilogue weight
    acc = acc * coef[:, None]
    mask = valid[:, None] & n_mask[None, :]
    if SCATTER:
        rows = tl.load(row_ptr + offs_m, mask=valid, other=0)
        out = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.atomic_add(out, acc, mask=mask, sem="relaxed")  # float32 target
    else:
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        current = tl.load(out, mask=mask, other=0.0)
        tl.store(out, (current.to(tl.float32) + acc).to(current.dtype), mask=mask)


@triton.jit
def expand_kernel(
    s1_ptr, b1_ptr, coef1_ptr, out1_ptr, s2_ptr, b2_ptr, coef2_ptr, out2_ptr,
    row_ptr, group_ptr, num_valid_ptr, ranks_ptr,
    num_rows, R, N1, N2, tiles1,
    stride_s1m, stride_s1r, stride_b1g, stride_b1n, stride_b1r, stride_o1m, stride_o1n,
    stride_s2m, stride_s2r, stride_b2g, stride_b2n, stride_b2r, stride_o2m, stride_o2n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    SCATTER: tl.constexpr, PAIR: tl.constexpr, HAS_NUM_VALID: tl.constexpr,
    HAS_RANKS: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    offs_m, valid, groups = _tile_assignments(
        group_ptr, num_valid_ptr, num_rows, BLOCK_M, HAS_NUM_VALID
    )
    tile_n = tl.program_id(1)
    # Column tiles [0, tiles1) belong to the first output, the rest to the second.
    if tile_n < tiles1:
        _expand_tile(
            s1_ptr, b1_ptr, coef1_ptr, out1_ptr, row_ptr, ranks_ptr,
            offs_m, valid, groups, tile_n, N1, R,
            stride_s1m, stride_s1r, stride_b1g, stride_b1n, stride_b1r, stride_o1m, stride_o1n,
            BLOCK_M, BLOCK_N, BLOCK_R, SCATTER, HAS_RANKS, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
    elif PAIR:
        _expand_tile(
            s2_ptr, b2_ptr, coef2_ptr, out2_ptr, row_ptr, ranks_ptr,
            offs_m, valid, groups, tile_n - tiles1, N2, R,
            stride_s2m, stride_s2r, stride_b2g, stride_b2n, stride_b2r, stride_o2m, stride_o2n,
            BLOCK_M, BLOCK_N, BLOCK_R, SCATTER, HAS_RANKS, DOT_DTYPE, DOT_PRECISION,
        )  # fmt: skip
