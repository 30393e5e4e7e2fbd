"""Triton paged attention and write_kv against the torch reference.

Batches interleave decode rows and prefill chunks (from scratch and mid-sequence) over scattered,
shuffled cache blocks full of stale data, with block-table entries past each sequence pointing
at other sequences' blocks. The reference runs on the CPU over the same caches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from mixserve.kernels import paged_attention, write_kv
from mixserve.kernels.paged_attention import reference
from mixserve.kernels.paged_attention import triton as attention_triton

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Relative to the largest reference magnitude.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
SCALE = 0.37  # not 1/sqrt(D): an op ignoring `scale` fails


@dataclass(frozen=True)
class Seq:
    seq_len: int  # cached tokens after this step
    query_len: int  # new tokens (1 = decode, 0 = not scheduled this step)


if ON_GPU:
    NUM_KV_HEADS, HEAD_DIM = 8, 128
    BATCH = [Seq(1800, 1), Seq(512, 512), Seq(37, 1), Seq(3000, 300), Seq(4096, 1), Seq(90, 70)]
    BATCH += [Seq(1 + 131 * i, 1) for i in range(1, 12)]
    BLOCK_SIZES = [16, 32, 1]
    WINDOWS = [None, 1, 700]
else:
    NUM_KV_HEADS, HEAD_DIM = 2, 16
    # The interpreter tiles 16 queries x 32 keys: the chunk of 37 spans three query tiles, the
    # longer sequences two or more key tiles.
    BATCH = [Seq(9, 1), Seq(7, 7), Seq(1, 1), Seq(50, 37), Seq(23, 1), Seq(4, 2), Seq(40, 1)]
    BLOCK_SIZES = [4, 16, 1]
    WINDOWS = [None, 1, 5]


@dataclass
class Case:
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, MB] int32
    query_lens: list[int]
    seq_lens: list[int]


def build(
    seqs: list[Seq],
    num_q_heads: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    head_dim: int = HEAD_DIM,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-s.seq_len // block_size) for s in seqs]
    num_blocks = sum(needed) + 5
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    # Stale entries past each sequence's blocks: they must never be read.
    block_tables = torch.randint(0, num_blocks, (len(seqs), max(needed) + 2), generator=gen)
    shape = (num_blocks, block_size, NUM_KV_HEADS, head_dim)
    k_cache = (torch.randn(shape, generator=gen) * 30).to(dtype)  # stale data everywhere
    v_cache = (torch.randn(shape, generator=gen) * 30).to(dtype)
    start = 0
    for b, (s, n) in enumerate(zip(seqs, needed, strict=True)):
        table = pool[start : start + n]
        start += n
        block_tables[b, :n] = torch.tensor(table)
        slots = torch.tensor(
            [table[j // block_size] * block_size + j % block_size for j in range(s.seq_len)],
            dtype=torch.int64,
        )
        kv = torch.randn(2, s.seq_len, NUM_KV_HEADS, head_dim, generator=gen)
        reference.write_kv(kv[0], kv[1], k_cache, v_cache, slots)
    num_tokens = sum(s.query_len for s in seqs)
    q = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(dtype)
    return Case(
        q,
        k_cache,
        v_cache,
        block_tables.to(torch.int32),
        [s.query_len for s in seqs],
        [s.seq_len for s in seqs],
    )


def run_both(case: Case, sliding_window: int | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    want = reference.paged_attention(
        case.q,
        case.k_cache,
        case.v_cache,
        case.block_tables,
        case.query_lens,
        case.seq_lens,
        scale=SCALE,
        sliding_window=sliding_window,
    )
    got = attention_triton.paged_attention(
        case.q.to(DEVICE),
        case.k_cache.to(DEVICE),
        case.v_cache.to(DEVICE),
        case.block_tables.to(DEVICE),
        case.query_lens,
        case.seq_lens,
        scale=SCALE,
        sliding_window=sliding_window,
        **kwargs,
    )
    return got.cpu(), want


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = TOL[want.dtype]
    scale = float(want.float().abs().max())
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale)


def orthogonal_grid() -> list:
    """(dtype, GQA ratio, block size, window) as an orthogonal array (columns i, j, i + j,
    i + 2j mod 3): every pair of levels of any two factors meets once, in 9 cases, not 81."""
    cases = []
    for i, gqa in enumerate([1, 2, 4]):
        for j, dtype in enumerate(DTYPES):
            block_size, window = BLOCK_SIZES[(i + j) % 3], WINDOWS[(i + 2 * j) % 3]
            name = f"{DTYPE_IDS[dtype]}-gqa{gqa}-bs{block_size}-w{window}"
            cases.append(pytest.param(dtype, gqa, block_size, window, id=name))
    return cases


@pytest.mark.parametrize(("dtype", "gqa", "block_size", "sliding_window"), orthogonal_grid())
def test_mixed_batch_matches_the_reference(dtype, gqa, block_size, sliding_window):
    case = build(BATCH, gqa * NUM_KV_HEADS, block_size, dtype, seed=gqa * 10 + block_size)
    got, want = run_both(case, sliding_window)
    assert_close(got, want)


@pytest.mark.parametrize(("splits", "sliding_window"), [(1, 7), (3, None), (8, 7)])
def test_decode_splits_combine_to_the_same_result(splits, sliding_window):
    """Split-KV decode, including splits left empty by short sequences or the window."""
    seqs = [Seq(s.seq_len, 1) for s in BATCH] + [Seq(2, 1)]
    case = build(seqs, 3 * NUM_KV_HEADS, 4, torch.float32, seed=splits)
    got, want = run_both(case, sliding_window, num_kv_splits=splits)
    assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_odd_head_dim_group_of_three_and_idle_sequences(dtype):
    """head_dim 24 (padded to 32), 3 query heads per KV head, a sequence with no new token."""
    seqs = [Seq(30, 19), Seq(12, 0), Seq(17, 1), Seq(5, 5)]
    case = build(seqs, 3 * NUM_KV_HEADS, 4, dtype, seed=7, head_dim=24)
    got, want = run_both(case, 6)
    assert_close(got, want)


def test_strided_q_and_prebuilt_metadata():
    """q as a view into a fused projection; metadata built once and reused across calls."""
    seqs = BATCH[:4]
    case = build(seqs, 2 * NUM_KV_HEADS, 4, torch.bfloat16, seed=11)
    num_tokens, num_q_heads, head_dim = case.q.shape
    fused = torch.randn(num_tokens, num_q_heads + 2 * NUM_KV_HEADS, head_dim).to(torch.bfloat16)
    fused[:, :num_q_heads] = case.q
    case.q = fused[:, :num_q_heads]
    assert not case.q.is_contiguous()
    meta = attention_triton.build_metadata(case.query_lens, case.seq_lens, DEVICE)
    for window in (None, 3):
        got, want = run_both(case, window, metadata=meta)
        assert_close(got, want)


def test_public_wrappers_dispatch_to_triton(monkeypatch):
    case = build(BATCH[:3], 2 * NUM_KV_HEADS, 4, torch.float32, seed=12)
    tensors = (case.q, case.k_cache, case.v_cache, case.block_tables)
    on_device = [t.to(DEVICE) for t in tensors]
    lens = (case.query_lens, case.seq_lens)
    calls = []
    real = attention_triton.paged_attention
    monkeypatch.setattr(
        attention_triton, "paged_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    got = paged_attention(*on_device, *lens, scale=SCALE).cpu()
    assert calls == [1]
    assert_close(got, reference.paged_attention(*tensors, *lens, scale=SCALE, sliding_window=None))
    monkeypatch.setenv("MIXSERVE_KERNELS", "reference")
    paged_attention(*on_device, *lens, scale=SCALE)
    assert calls == [1]


@pytest.mark.parametrize(
    ("dtype", "src_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("block_size", [1, 16])
def test_write_kv_matches_the_reference_exactly(dtype, src_dtype, block_size):
    """k, v as strided views of a fused projection in src_dtype, the cache in dtype: values
    land rounded to nearest like the reference's copy, padding slots (-1) and unlisted slots
    stay untouched."""
    num_tokens = 64 if ON_GPU else 13
    num_blocks = 2 * -(-num_tokens // block_size) + 1
    gen = torch.Generator().manual_seed(block_size)
    heads = torch.randn(num_tokens, 5, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(src_dtype)
    k, v = heads[:, 1], heads[:, 3]
    assert not k.is_contiguous()
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::5] = -1
    listed = slots >= 0
    want_k, want_v = k_cache.clone(), v_cache.clone()
    reference.write_kv(k[listed], v[listed], want_k, want_v, slots[listed])
    got_k, got_v = k_cache.to(DEVICE), v_cache.to(DEVICE)
    write_kv(k.to(DEVICE), v.to(DEVICE), got_k, got_v, slots.to(DEVICE))
    assert torch.equal(got_k.cpu(), want_k) and torch.equal(got_v.cpu(), want_v)


def test_single_tile_decode_and_one_token_prefill_edges():
    """Sequences of length 1 (decode) and a two-token chunk whose first query sees one key."""
    seqs = [Seq(1, 1), Seq(2, 2), Seq(1, 1)]
    case = build(seqs, NUM_KV_HEADS, 1, torch.float32, seed=13)
    for window in (None, 1):
        got, want = run_both(case, window)
        assert_close(got, want)
        assert not math.isnan(float(got.sum()))
