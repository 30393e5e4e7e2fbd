"""Triton paged attention: decode rows and prefill chunks of one flattened batch.

Sequences with one new token go to the split-KV decode kernel (grid ``(Bd, Hkv, splits)``: the
query heads of a KV head share every K/V tile; long contexts are cut into splits merged by a
log-sum-exp combine kernel when there are too few (row, KV head) programs to fill the GPU).
Longer chunks go to the varlen prefill kernel (grid ``(query tiles, Hq)``; a tile is BLOCK_M
queries of one sequence, attending causally, and within the sliding window, to its cached keys).
Both kernels read K/V through the block table. The host lists give the tiling; the device
metadata built from them is cached for the next call with the same lists (every layer of a step).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mixserve.kernels.paged_attention._triton_kernels import (
    _cast,
    _decode_combine_kernel,
    _decode_kernel,
    _prefill_kernel,
)

_LOG2E = 1.0 / math.log(2.0)
_MAX_SPLITS = 16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class AttentionMetadata:
    """Device-side description of a batch; build once per step with `build_metadata`."""

    key: tuple  # (query_lens, seq_lens, device, block_m) it was built from
    cu_q: torch.Tensor  # [B + 1] int32 first row of each sequence
    seq_lens: torch.Tensor  # [B] int32
    tile_seq: torch.Tensor  # [tiles] int32 prefill query tiles: sequence
    tile_start: torch.Tensor  # [tiles] int32 first query of the tile within the sequence
    dec_seq: torch.Tensor  # [Bd] int32 decode sequences
    dec_row: torch.Tensor  # [Bd] int32 their rows in q
    max_decode_len: int  # longest decode sequence (host), for the split choice


def _block_m() -> int:
    return 16 if _interpreting() else 64


def build_metadata(
    query_lens: Sequence[int], seq_lens: Sequence[int], device: torch.device
) -> AttentionMetadata:
    block_m = _block_m()
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    tile_seq, tile_start, dec_seq, dec_row = [], [], [], []
    for b, n in enumerate(query_lens):
        if n == 1:
            dec_seq.append(b)
            dec_row.append(starts[b])
        elif n > 1:
            for first in range(0, n, block_m):
                tile_seq.append(b)
                tile_start.append(first)
    # One host -> device copy for all six arrays.
    packed = torch.tensor(
        starts + list(seq_lens) + tile_seq + tile_start + dec_seq + dec_row, dtype=torch.int32
    ).to(device, non_blocking=True)
    sizes = [len(starts), len(seq_lens), len(tile_seq), len(tile_seq), len(dec_seq), len(dec_seq)]
    parts = packed.split(sizes)
    max_decode = max((seq_lens[b] for b in dec_seq), default=0)
    key = (tuple(query_lens), tuple(seq_lens), device, block_m)
    return AttentionMetadata(key, *parts, max_decode_len=max_decode)


_cached: AttentionMetadata | None = None


def _metadata(
    query_lens: Sequence[int], seq_lens: Sequence[int], device: torch.device
) -> AttentionMetadata:
    global _cached
    key = (tuple(query_lens), tuple(seq_lens), device, _block_m())
    if _cached is None or _cached.key != key:
        _cached = build_metadata(query_lens, seq_lens, device)
    return _cached


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _decode_splits(num_programs: int, max_len: int, block_n: int, device: torch.device) -> int:
    """Splits so (rows x KV heads x splits) covers ~2 waves, each split >= 4 KV tiles."""
    if num_programs == 0:
        return 1
    wanted = triton.cdiv(2 * _num_sms(device), num_programs)
    return max(1, min(wanted, triton.cdiv(max_len, 4 * block_n), _MAX_SPLITS))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    *,
    scale: float,
    sliding_window: int | None = None,
    metadata: AttentionMetadata | None = None,
    num_kv_splits: int | None = None,
) -> torch.Tensor:
    """Same contract as ``mixserve.kernels.paged_attention``; sequences with no new token are
    skipped. ``metadata`` (from `build_metadata`) skips the host-side tiling;
    ``num_kv_splits`` forces the decode split count (tests)."""
    num_tokens, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    meta = metadata or _metadata(query_lens, seq_lens, q.device)
    interpret = _interpreting()
    d_pad = triton.next_power_of_2(max(head_dim, 16))
    # KV tile: 64 keys on the GPU (32 for head_dim > 128, to bound registers); 32 under the
    # interpreter, where the test sequences still span several tiles.
    block_n = 32 if interpret or d_pad > 128 else 64
    window = sliding_window if sliding_window is not None else 0
    common = {
        "HEAD_DIM": head_dim,
        "D_PAD": d_pad,
        "BLOCK_SIZE": block_size,
        "HAS_WINDOW": sliding_window is not None,
        "UPCAST": interpret,
        # fp32 models get exact fp32 products (the reference's), not TF32.
        "DOT_PREC": "ieee" if q.dtype == torch.float32 else "tf32",
    }
    strides = (*q.stride(), *k_cache.stride(), *v_cache.stride(), out.stride(0), out.stride(1))
    scale_log2 = scale * _LOG2E

    num_tiles = meta.tile_seq.shape[0]
    if num_tiles:
        _prefill_kernel[(num_tiles, num_q_heads)](
            q, k_cache, v_cache, out, block_tables, meta.tile_seq, meta.tile_start,
            meta.cu_q, meta.seq_lens, scale_log2, window, *strides, block_tables.stride(0),
            GROUP=group, BLOCK_M=_block_m(), BLOCK_N=block_n, **common,
        )  # fmt: skip

    num_decode = meta.dec_seq.shape[0]
    if num_decode:
        max_len = meta.max_decode_len if window == 0 else min(meta.max_decode_len, window)
        splits = num_kv_splits or _decode_splits(
            num_decode * num_kv_heads, max_len, block_n, q.device
        )
        part_out = part_lse = out  # unused placeholders when there is one split
        if splits > 1:
            part_out = torch.empty(
                (num_decode, num_q_heads, splits, d_pad), dtype=torch.float32, device=q.device
            )
            part_lse = torch.empty(part_out.shape[:3], dtype=torch.float32, device=q.device)
        _decode_kernel[(num_decode, num_kv_heads, splits)](
            q, k_cache, v_cache, out, part_out, part_lse, block_tables, meta.dec_seq,
            meta.dec_row, meta.seq_lens, scale_log2, window, *strides, block_tables.stride(0),
            GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
            NUM_SPLITS=splits, **common,
        )  # fmt: skip
        if splits > 1:
            _decode_combine_kernel[(num_decode, num_q_heads)](
                part_out, part_lse, out, meta.dec_row, out.stride(0), out.stride(1),
                HEAD_DIM=head_dim, D_PAD=d_pad, NUM_SPLITS=splits,
                S_PAD=triton.next_power_of_2(splits), UPCAST=interpret,
            )  # fmt: skip
    return out


@triton.jit
def _write_kv_kernel(
    k_ptr,  # [T, Hkv, D]
    v_ptr,
    k_cache_ptr,  # [NB, BS, Hkv, D]
    v_cache_ptr,
    slot_ptr,  # [T] int64; negative = padding, skipped
    stride_kt,
    stride_kh,
    stride_kd,
    stride_vt,
    stride_vh,
    stride_vd,
    stride_cb,  # strides of the caches (the two share one layout)
    stride_cs,
    stride_ch,
    stride_cd,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    H_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    h = tl.arange(0, H_PAD)
    d = tl.arange(0, D_PAD)
    # slot >= 0 broadcast as a tensor: the interpreter rejects a scalar int1 in a mask.
    ok = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM) & ((h[:, None] * 0 + slot) >= 0)
    block = slot // BLOCK_SIZE
    dst = block * stride_cb + (slot % BLOCK_SIZE) * stride_cs
    dst = dst + h[:, None] * stride_ch + d[None, :] * stride_cd  # [H_PAD, D_PAD]
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd, mask=ok)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd, mask=ok)
    if INTERPRET:
        k = k.to(tl.float32)  # the interpreter has no bf16 arithmetic: round from fp32
        v = v.to(tl.float32)
    tl.store(k_cache_ptr + dst, _cast(k, k_cache_ptr.dtype.element_ty, INTERPRET), mask=ok)
    tl.store(v_cache_ptr + dst, _cast(v, v_cache_ptr.dtype.element_ty, INTERPRET), mask=ok)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Same contract as ``mixserve.kernels.paged_attention.write_kv``; negative slots (padding)
    are skipped. One program per token writes its [Hkv, D] rows of K and V."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k_cache.stride() == v_cache.stride(), "K and V caches share one layout"
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, *k.stride(), *v.stride(), *k_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        H_PAD=triton.next_power_of_2(num_kv_heads), D_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1], INTERPRET=_interpreting(),
    )  # fmt: skip
