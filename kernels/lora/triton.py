"""Triton routed LoRA: segmented shrink and expand, one launch per projection (or pair).

Tiling: each program owns BLOCK_M consecutive assignments (and one tile of output columns). The
assignments are sorted by group, so a tile holds one group or a few; the program loops over the
distinct groups present, masking the rows of the others, so every `tl.dot` uses a single A or B
matrix. The grid depends only on the padded assignment count P and the output width: no host
sync, the same launch for any mix of adapters and experts, and capturable in a CUDA graph. Rows
at or past ``num_valid`` are masked out; shrink writes zeros there, expand leaves them alone.

Shrink split-K: decode batches have few row tiles, each looping over many groups' A matrices, so
the shrink slices K over a third grid axis (chosen from shapes only) and adds float32 partial sums
atomically. The pair ops feed one x tile to two A matrices (shrink) or split the column tiles of
one launch between two outputs (expand).

Ranks: A/B are zero-padded to the stacked rank R. With ``group_ranks`` the loads of the padded
rank rows/columns are masked off (no memory traffic), which is safe whenever the given rank is at
least the group's true rank.

Expand scatter: top-k gives several assignments per output row, so scattered results are added
with float32 atomics, straight into ``out`` when it is float32, else into a float32 buffer that is
added to ``out`` once (one rounding to the output dtype).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mixserve.kernels.assignments.segments import Segments
from mixserve.kernels.lora._triton_kernels import expand_kernel, shrink_kernel


def _block_m(num_rows: int) -> int:
    # Decode batches have few assignments (often one per group): small tiles waste fewer rows.
    return 16 if num_rows <= 128 else 64


def _split_k(num_rows: int, hidden: int, block_m: int) -> int:
    """K slices per row tile. Decode has few row tiles, each looping over many groups' A
    matrices: slicing K spreads those loads over more programs (partial sums added atomically)."""
    row_tiles = triton.cdiv(num_rows, block_m)
    if row_tiles >= 64 or hidden < 512:
        return 1
    return max(1, min(hidden // 256, 128 // row_tiles))


def _block_r(rank: int) -> int:
    return max(16, min(64, triton.next_power_of_2(rank)))  # tl.dot needs >= 16


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _dot_args(dtype: torch.dtype) -> dict[str, object]:
    """DOT_DTYPE / DOT_PRECISION for tiles of this dtype."""
    if dtype not in _TL_DTYPES:
        raise TypeError(f"routed LoRA kernels take float32, bfloat16 or float16, not {dtype}")
    dot_dtype = _TL_DTYPES[dtype]
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584).
        dot_dtype = tl.float32
    # fp32 products at full precision: TF32 would miss the fp32 tolerances.
    precision = "ieee" if dot_dtype == tl.float32 else "tf32"
    return {"DOT_DTYPE": dot_dtype, "DOT_PRECISION": precision}


def _segment_args(segments: Segments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    num_valid = segments.num_valid
    nv = num_valid if num_valid is not None else segments.group_ids  # unused dummy pointer
    return segments.row_ids, segments.group_ids, nv, num_valid is not None


def _ranks_arg(group_ranks: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if group_ranks is None:
        return like, False
    return group_ranks.to(torch.int32), True


def _shrink(
    x: torch.Tensor,
    lora_as: tuple[torch.Tensor, ...],
    segments: Segments,
    gather_rows: bool,
    group_ranks: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    num_rows = segments.group_ids.shape[0]
    _, rank, hidden = lora_as[0].shape  # [G, R, K]
    if num_rows == 0 or rank == 0 or hidden == 0:
        return tuple(x.new_zeros(num_rows, rank) for _ in lora_as)  # [P, R] each
    pair = len(lora_as) == 2
    a1, a2 = lora_as[0], lora_as[-1]
    block_m, block_r, block_k = _block_m(num_rows), _block_r(rank), 64
    split_k = _split_k(num_rows, hidden, block_m)
    k_per_split = triton.cdiv(triton.cdiv(hidden, split_k), block_k) * block_k
    split_k = triton.cdiv(hidden, k_per_split)  # no empty slices
    if split_k > 1:  # float32 partial sums, added atomically
        outs = tuple(x.new_zeros(num_rows, rank, dtype=torch.float32) for _ in lora_as)
    else:
        outs = tuple(x.new_empty(num_rows, rank) for _ in lora_as)
    s1, s2 = outs[0], outs[-1]
    row_ids, group_ids, nv, has_nv = _segment_args(segments)
    ranks, has_ranks = _ranks_arg(group_ranks, group_ids)
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(rank, block_r), split_k)
    shrink_kernel[grid](
        x, a1, a2, s1, s2, row_ids, group_ids, nv, ranks,
        num_rows, hidden, rank, k_per_split,
        x.stride(0), x.stride(1),
        a1.stride(0), a1.stride(1), a1.stride(2),
        a2.stride(0), a2.stride(1), a2.stride(2),
        s1.stride(0), s1.stride(1), s2.stride(0), s2.stride(1),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        GATHER=gather_rows, PAIR=pair, HAS_NUM_VALID=has_nv, HAS_RANKS=has_ranks,
        ATOMIC_OUT=split_k > 1, **_dot_args(x.dtype),
    )  # fmt: skip
    return tuple(o.to(x.dtype) for o in outs)


def _expand(
    ss: tuple[torch.Tensor, ...],
    lora_bs: tuple[torch.Tensor, ...],
    segments: Segments,
    coefs: tuple[torch.Tensor, ...],
    outs: tuple[torch.Tensor, ...],
    scatter_rows: bool,
    group_ranks: torch.Tensor | None,
) -> None:
    num_rows = segments.group_ids.shape[0]
    rank = lora_bs[0].shape[2]  # [G, N_out, R]
    if num_rows == 0 or rank == 0:
        return
    pair = len(ss) == 2
    block_m, block_n, block_r = _block_m(num_rows), 64, _block_r(rank)
    widths = [b.shape[1] for b in lora_bs]
    tiles = [triton.cdiv(width, block_n) for width in widths]
    if sum(tiles) == 0:
        return
    # Atomics run in float32: other dtypes accumulate in a buffer added to `out` once.
    targets = tuple(
        out.new_zeros(out.shape, dtype=torch.float32)
        if scatter_rows and out.dtype != torch.float32
        else out
        for out in outs
    )
    coefs = tuple(c.to(torch.float32).contiguous() for c in coefs)  # [P] each
    s1, s2 = ss[0], ss[-1]
    b1, b2 = lora_bs[0], lora_bs[-1]
    o1, o2 = targets[0], targets[-1]
    row_ids, group_ids, nv, has_nv = _segment_args(segments)
    ranks, has_ranks = _ranks_arg(group_ranks, group_ids)
    grid = (triton.cdiv(num_rows, block_m), tiles[0] + (tiles[1] if pair else 0))
    expand_kernel[grid](
        s1, b1, coefs[0], o1, s2, b2, coefs[-1], o2,
        row_ids, group_ids, nv, ranks,
        num_rows, rank, widths[0], widths[-1], tiles[0],
        s1.stride(0), s1.stride(1), b1.stride(0), b1.stride(1), b1.stride(2),
        o1.stride(0), o1.stride(1),
        s2.stride(0), s2.stride(1), b2.stride(0), b2.stride(1), b2.stride(2),
        o2.stride(0), o2.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        SCATTER=scatter_rows, PAIR=pair, HAS_NUM_VALID=has_nv, HAS_RANKS=has_ranks,
        **_dot_args(s1.dtype),
    )  # fmt: skip
    for out, target in zip(outs, targets, strict=True):
        if target is not out:
            out.add_(target)


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    segments: Segments,
    *,
    gather_rows: bool,
    group_ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    return _shrink(x, (lora_a,), segments, gather_rows, group_ranks)[0]


def lora_shrink_pair(
    x: torch.Tensor,
    lora_a1: torch.Tensor,
    lora_a2: torch.Tensor,
    segments: Segments,
    *,
    gather_rows: bool,
    group_ranks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if lora_a1.shape != lora_a2.shape:  # the fused launch shares the rank tiling
        return (
            _shrink(x, (lora_a1,), segments, gather_rows, group_ranks)[0],
            _shrink(x, (lora_a2,), segments, gather_rows, group_ranks)[0],
        )
    s1, s2 = _shrink(x, (lora_a1, lora_a2), segments, gather_rows, group_ranks)
    return s1, s2


def lora_expand(
    s: torch.Tensor,
    lora_b: torch.Tensor,
    segments: Segments,
    coef: torch.Tensor,
    out: torch.Tensor,
    *,
    scatter_rows: bool,
    group_ranks: torch.Tensor | None = None,
) -> None:
    _expand((s,), (lora_b,), segments, (coef,), (out,), scatter_rows, group_ranks)


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
    scatter_rows: bool,
    group_ranks: torch.Tensor | None = None,
) -> None:
    if lora_b1.shape[2] != lora_b2.shape[2] or s1.dtype != s2.dtype:
        _expand((s1,), (lora_b1,), segments, (coef1,), (out1,), scatter_rows, group_ranks)
        _expand((s2,), (lora_b2,), segments, (coef2,), (out2,), scatter_rows, group_ranks)
        return
    _expand(
        (s1, s2), (lora_b1, lora_b2), segments, (coef1, coef2), (out1, out2), scatter_rows,
        group_ranks,
    )  # fmt: skip
