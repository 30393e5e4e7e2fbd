"""write_kv + paged_attention against dense causal attention per sequence in float64."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mixserve.kernels import paged_attention, write_kv

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
NUM_KV_HEADS, HEAD_DIM = 2, 16
# Not 1/sqrt(HEAD_DIM), so an op that ignored `scale` would fail.
SCALE = 0.37


@dataclass(frozen=True)
class Seq:
    seq_len: int  # tokens in the cache after this step
    query_len: int  # new tokens this step (1 = decode)

    @property
    def num_cached(self) -> int:
        return self.seq_len - self.query_len


# Decode rows and prefill chunks interleaved; chunks from scratch and from mid-sequence.
BATCH = [
    Seq(9, 1),
    Seq(7, 7),
    Seq(1, 1),
    Seq(31, 5),
    Seq(23, 1),
    Seq(40, 16),
    Seq(4, 2),
    Seq(17, 1),
]


@dataclass
class PagedBatch:
    keys: list[torch.Tensor]  # per sequence [seq_len, Hkv, D] float32, every position
    values: list[torch.Tensor]
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, MB] int32
    tables: list[list[int]]  # the blocks each sequence owns, in position order
    garbage_k: torch.Tensor  # cache contents before any write
    garbage_v: torch.Tensor


def flat_slot(table: list[int], pos: int, block_size: int) -> int:
    return table[pos // block_size] * block_size + pos % block_size


def build(
    seqs: list[Seq], num_q_heads: int, block_size: int, dtype: torch.dtype, seed: int
) -> PagedBatch:
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-s.seq_len // block_size) for s in seqs]
    num_blocks = sum(needed) + 6
    # Each sequence gets scattered, shuffled blocks out of one permutation of the pool.
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables, start = [], 0
    for n in needed:
        tables.append(pool[start : start + n])
        start += n
    max_blocks = max(needed) + 2
    # Entries past a sequence's own blocks point at other sequences' blocks: they must be masked.
    block_tables = torch.randint(0, num_blocks, (len(seqs), max_blocks), generator=gen)
    for b, table in enumerate(tables):
        block_tables[b, : len(table)] = torch.tensor(table)
    block_tables = block_tables.to(torch.int32)

    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    # Stale data everywhere: unwritten slots must never leak into the result.
    garbage_k = (torch.randn(shape, generator=gen) * 30).to(dtype)
    garbage_v = (torch.randn(shape, generator=gen) * 30).to(dtype)
    keys = [torch.randn(s.seq_len, NUM_KV_HEADS, HEAD_DIM, generator=gen) for s in seqs]
    values = [torch.randn(s.seq_len, NUM_KV_HEADS, HEAD_DIM, generator=gen) for s in seqs]
    num_tokens = sum(s.query_len for s in seqs)
    q = torch.randn(num_tokens, num_q_heads, HEAD_DIM, generator=gen).to(dtype)
    return PagedBatch(
        keys,
        values,
        q,
        garbage_k.clone(),
        garbage_v.clone(),
        block_tables,
        tables,
        garbage_k,
        garbage_v,
    )


def write_positions(pb: PagedBatch, seqs: list[Seq], block_size: int, new: bool) -> None:
    """write_kv for the cached history (new=False) or this step's tokens, in step order."""
    ks, vs, slots = [], [], []
    for b, s in enumerate(seqs):
        positions = range(s.num_cached, s.seq_len) if new else range(s.num_cached)
        for pos in positions:
            ks.append(pb.keys[b][pos])
            vs.append(pb.values[b][pos])
            slots.append(flat_slot(pb.tables[b], pos, block_size))
    if not slots:
        return
    write_kv(torch.stack(ks), torch.stack(vs), pb.k_cache, pb.v_cache, torch.tensor(slots))


def naive_attention(
    pb: PagedBatch, seqs: list[Seq], dtype: torch.dtype, sliding_window: int | None
) -> torch.Tensor:
    num_q_heads = pb.q.shape[1]
    group = num_q_heads // NUM_KV_HEADS
    out = torch.zeros(pb.q.shape, dtype=torch.float64)
    row = 0
    for b, s in enumerate(seqs):
        keys = pb.keys[b].to(dtype).double()
        values = pb.values[b].to(dtype).double()
        for i in range(s.query_len):
            pos = s.num_cached + i
            lo = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
            for h in range(num_q_heads):
                kv = h // group
                scores = SCALE * (keys[lo : pos + 1, kv] @ pb.q[row, h].double())
                exps = torch.exp(scores - scores.max())
                out[row, h] = (exps / exps.sum()) @ values[lo : pos + 1, kv]
            row += 1
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sliding_window", [None, 1, 5])
@pytest.mark.parametrize("gqa", [1, 2, 4])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_attention_matches_dense_causal_attention(dtype, sliding_window, gqa, block_size):
    pb = build(BATCH, gqa * NUM_KV_HEADS, block_size, dtype, seed=block_size * 10 + gqa)
    write_positions(pb, BATCH, block_size, new=False)
    write_positions(pb, BATCH, block_size, new=True)
    got = paged_attention(
        pb.q,
        pb.k_cache,
        pb.v_cache,
        pb.block_tables,
        [s.query_len for s in BATCH],
        [s.seq_len for s in BATCH],
        scale=SCALE,
        sliding_window=sliding_window,
    )
    assert got.dtype == dtype and got.shape == pb.q.shape
    want = naive_attention(pb, BATCH, dtype, sliding_window)
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))
    if sliding_window is not None:
        # The window must cut keys off (not vacuous).
        assert not torch.allclose(want, naive_attention(pb, BATCH, dtype, None))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_only_and_prefill_only_batches(dtype):
    """The same sequences routed through one path at a time give the dense result too."""
    for seqs in ([Seq(5, 1), Seq(33, 1), Seq(1, 1)], [Seq(12, 12), Seq(20, 3)]):
        pb = build(seqs, 4, 4, dtype, seed=len(seqs))
        write_positions(pb, seqs, 4, new=False)
        write_positions(pb, seqs, 4, new=True)
        got = paged_attention(
            pb.q,
            pb.k_cache,
            pb.v_cache,
            pb.block_tables,
            [s.query_len for s in seqs],
            [s.seq_len for s in seqs],
            scale=SCALE,
        )
        want = naive_attention(pb, seqs, dtype, None)
        tol = TOL[dtype]
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_write_kv_places_rows_by_slot_and_touches_nothing_else(dtype, block_size):
    pb = build(BATCH, NUM_KV_HEADS, block_size, dtype, seed=99)
    write_positions(pb, BATCH, block_size, new=False)
    write_positions(pb, BATCH, block_size, new=True)
    written = torch.zeros(pb.k_cache.shape[:2], dtype=torch.bool)
    for b, s in enumerate(BATCH):
        for pos in range(s.seq_len):
            block, offset = pb.tables[b][pos // block_size], pos % block_size
            assert torch.equal(pb.k_cache[block, offset], pb.keys[b][pos].to(dtype))
            assert torch.equal(pb.v_cache[block, offset], pb.values[b][pos].to(dtype))
            written[block, offset] = True
    assert torch.equal(pb.k_cache[~written], pb.garbage_k[~written])
    assert torch.equal(pb.v_cache[~written], pb.garbage_v[~written])


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_from_a_fused_qkv_projection(dtype):
    """k and v as strided views into one [T, (Hq + 2 Hkv) * D] projection output, in float32
    while the cache is in dtype."""
    num_tokens, num_q_heads, block_size = 11, 4, 4
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * NUM_KV_HEADS) * HEAD_DIM, generator=gen)
    heads = qkv.view(num_tokens, num_q_heads + 2 * NUM_KV_HEADS, HEAD_DIM)
    k = heads[:, num_q_heads : num_q_heads + NUM_KV_HEADS]
    v = heads[:, num_q_heads + NUM_KV_HEADS :]
    assert not k.is_contiguous() and not v.is_contiguous()
    shape = (8, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.zeros(shape, dtype=dtype)
    v_cache = torch.zeros(shape, dtype=dtype)
    slots = torch.randperm(8 * block_size, generator=gen)[:num_tokens]
    write_kv(k, v, k_cache, v_cache, slots)
    for t in range(num_tokens):
        block, offset = divmod(int(slots[t]), block_size)
        assert torch.equal(k_cache[block, offset], k[t].to(dtype))
        assert torch.equal(v_cache[block, offset], v[t].to(dtype))
    written = torch.zeros(8 * block_size, dtype=torch.bool)
    written[slots] = True
    assert torch.all(k_cache.view(8 * block_size, -1)[~written] == 0)
    assert torch.all(v_cache.view(8 * block_size, -1)[~written] == 0)
