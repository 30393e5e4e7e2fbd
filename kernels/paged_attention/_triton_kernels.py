"""Triton attention kernels behind `paged_attention.triton`: varlen prefill, split-KV decode.

Every kernel reads the cache through the block table one key position at a time
(``block_tables[b, j // BLOCK_SIZE]``, offset ``j % BLOCK_SIZE``), so any cache block size works
with any KV tile size. Softmax is online (flash-attention style) in fp32, in base 2 with the
scale folded into ``scale_log2``. ``UPCAST`` (set under TRITON_INTERPRET) computes the dots in
fp32 because the interpreter's ``tl.dot`` multiplies bf16 bit patterns (triton#11584); the
probabilities are still rounded to the value dtype first, as on the GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x (fp32) to dtype, rounding to nearest even: the interpreter's fp32 -> bf16 cast
    truncates, so there the bits are rounded first and the truncation is exact."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _attend_tile(
    q,  # [M, D_PAD] in q's dtype
    m_i,  # [M] running max (log2 units)
    l_i,  # [M] running sum
    acc,  # [M, D_PAD] fp32
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,  # this sequence's block-table row
    j,  # [BLOCK_N] key positions
    j_ok,  # [BLOCK_N] positions to read (inside the sequence and the tile's key range)
    visible,  # [M, BLOCK_N]
    kv_head,
    scale_log2,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One KV tile of the online softmax: gather K/V rows through the block table, update."""
    d = tl.arange(0, D_PAD)
    block = tl.load(table_ptr + j // BLOCK_SIZE, mask=j_ok, other=0).to(tl.int64)
    offset = j % BLOCK_SIZE
    kv_ok = j_ok[:, None] & (d[None, :] < HEAD_DIM)
    k_rows = block[:, None] * stride_kb + offset[:, None] * stride_ks + kv_head * stride_kh
    v_rows = block[:, None] * stride_vb + offset[:, None] * stride_vs + kv_head * stride_vh
    # Cached rows in q's dtype, as the reference casts them.
    k = tl.load(k_cache_ptr + k_rows + d[None, :] * stride_kd, mask=kv_ok, other=0.0).to(q.dtype)
    v = tl.load(v_cache_ptr + v_rows + d[None, :] * stride_vd, mask=kv_ok, other=0.0).to(q.dtype)
    q_dot = q
    if UPCAST:
        q_dot = q.to(tl.float32)
        k = k.to(tl.float32)
    s = tl.dot(q_dot, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # [M, BLOCK_N]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # Rows that have seen no key yet keep m = -inf; shift them by 0 so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p_dot = _cast(p, q.dtype, UPCAST)  # rounded like the tensor-core operand on the GPU
    if UPCAST:
        p_dot = p_dot.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p_dot, v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,  # [T, Hq, D]
    block_tables_ptr,  # [B, MB] int
    tile_seq_ptr,  # [tiles] int32 sequence of each query tile
    tile_start_ptr,  # [tiles] int32 first query (index within the sequence) of the tile
    cu_q_ptr,  # [B + 1] int32 first row of each sequence in q
    seq_lens_ptr,  # [B] int32
    scale_log2,
    window,  # keys j > pos - window are visible (when HAS_WINDOW)
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_ot,
    stride_oh,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Grid (query tiles, Hq): BLOCK_M queries of one sequence and one query head."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.load(tile_seq_ptr + tile)
    q_first = tl.load(tile_start_ptr + tile)
    row0 = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - row0
    seq_len = tl.load(seq_lens_ptr + b)
    kv_head = head // GROUP
    i = q_first + tl.arange(0, BLOCK_M)  # query index within the sequence
    i_ok = i < q_len
    pos = seq_len - q_len + i  # [BLOCK_M] cache position of each query
    d = tl.arange(0, D_PAD)
    rows = (row0 + i).to(tl.int64)
    q_ok = i_ok[:, None] & (d[None, :] < HEAD_DIM)
    q_off = rows[:, None] * stride_qt + head * stride_qh + d[None, :] * stride_qd
    q = tl.load(q_ptr + q_off, mask=q_ok, other=0.0)

    # Keys [lo, hi): causal up to the tile's last query, the window from its first.
    pos_first = seq_len - q_len + q_first
    hi = tl.minimum(pos_first + BLOCK_M, seq_len)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(pos_first - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    table_ptr = block_tables_ptr + b.to(tl.int64) * stride_bt
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        visible = (j[None, :] <= pos[:, None]) & i_ok[:, None]
        if HAS_WINDOW:
            visible = visible & (j[None, :] > pos[:, None] - window)
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_ptr, j, j < hi, visible, kv_head,
            scale_log2, stride_kb, stride_ks, stride_kh, stride_kd,
            stride_vb, stride_vs, stride_vh, stride_vd,
            HEAD_DIM, D_PAD, BLOCK_SIZE, UPCAST, DOT_PREC,
        )  # fmt: skip
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_off = rows[:, None] * stride_ot + head * stride_oh + d[None, :]
    tl.store(out_ptr + o_off, _cast(out, out_ptr.dtype.element_ty, UPCAST), mask=q_ok)


@triton.jit
def _decode_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,  # [T, Hq, D] (NUM_SPLITS == 1)
    part_out_ptr,  # [Bd, Hq, NUM_SPLITS, D_PAD] fp32 (NUM_SPLITS > 1)
    part_lse_ptr,  # [Bd, Hq, NUM_SPLITS] fp32, log2 units
    block_tables_ptr,
    dec_seq_ptr,  # [Bd] int32 sequence of each decode row
    dec_row_ptr,  # [Bd] int32 its row in q
    seq_lens_ptr,
    scale_log2,
    window,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_ot,
    stride_oh,
    stride_bt,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,  # >= 16: tl.dot needs 16 rows; padded heads are masked
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Grid (Bd, Hkv, NUM_SPLITS): the GROUP query heads sharing a KV head read each K/V tile
    once; split s covers the s-th contiguous share of the sequence's visible keys."""
    n = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    b = tl.load(dec_seq_ptr + n)
    row = tl.load(dec_row_ptr + n).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + b)
    g = tl.arange(0, G_PAD)
    g_ok = g < GROUP
    heads = kv_head * GROUP + g
    d = tl.arange(0, D_PAD)
    q_ok = g_ok[:, None] & (d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=q_ok, other=0.0)  # fmt: skip

    # The query sits at seq_len - 1: every key below seq_len is causal, the window keeps the
    # last `window` of them.
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    chunk = tl.cdiv(tl.cdiv(seq_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)
    table_ptr = block_tables_ptr + b.to(tl.int64) * stride_bt
    m_i = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((G_PAD,), dtype=tl.float32)
    acc = tl.zeros((G_PAD, D_PAD), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_N):
        j = s0 + tl.arange(0, BLOCK_N)
        j_ok = j < end
        visible = g_ok[:, None] & j_ok[None, :]
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_ptr, j, j_ok, visible, kv_head,
            scale_log2, stride_kb, stride_ks, stride_kh, stride_kd,
            stride_vb, stride_vs, stride_vh, stride_vd,
            HEAD_DIM, D_PAD, BLOCK_SIZE, UPCAST, DOT_PREC,
        )  # fmt: skip
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        o_off = row * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + o_off, _cast(out, out_ptr.dtype.element_ty, UPCAST), mask=q_ok)
    else:
        # An empty split (short sequence) reports lse = -inf and weighs nothing when combined.
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        part = (n.to(tl.int64) * (GROUP * tl.num_programs(1)) + heads) * NUM_SPLITS + split
        tl.store(part_lse_ptr + part, lse, mask=g_ok)
        p_off = part[:, None] * D_PAD + d[None, :]
        tl.store(part_out_ptr + p_off, out, mask=g_ok[:, None])


@triton.jit
def _decode_combine_kernel(
    part_out_ptr,  # [Bd, Hq, NUM_SPLITS, D_PAD] fp32
    part_lse_ptr,  # [Bd, Hq, NUM_SPLITS] fp32
    out_ptr,
    dec_row_ptr,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    S_PAD: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Grid (Bd, Hq): merge the splits' partial softmaxes by their log-sum-exps."""
    n = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(dec_row_ptr + n).to(tl.int64)
    sp = tl.arange(0, S_PAD)
    sp_ok = sp < NUM_SPLITS
    d = tl.arange(0, D_PAD)
    base = (n.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + base + sp, mask=sp_ok, other=float("-inf"))  # [S_PAD]
    top = tl.max(lse, axis=0)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - top))
    parts = tl.load(part_out_ptr + (base + sp)[:, None] * D_PAD + d[None, :],
                    mask=sp_ok[:, None], other=0.0)  # fmt: skip
    out = tl.sum(w[:, None] * parts, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + d,
             _cast(out, out_ptr.dtype.element_ty, UPCAST), mask=d < HEAD_DIM)  # fmt: skip
