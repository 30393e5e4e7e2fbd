"""BlockManager: ref counts, prefix cache keyed by adapter, LRU reuse, fork."""

from __future__ import annotations

import pytest

from mixserve.scheduler import BlockManager


def test_allocate_and_free_keep_counts_consistent():
    bm = BlockManager(8, 4)
    assert bm.allocate(1, 10)  # 3 blocks
    assert bm.num_free_blocks == 5 and len(bm.block_table(1)) == 3
    assert bm.allocate(1, 12)  # still 3 blocks
    assert bm.allocate(1, 13) and len(bm.block_table(1)) == 4
    assert not bm.allocate(2, 20)  # needs 5, only 4 free: refused, nothing changes
    assert not bm.has(2) and bm.num_free_blocks == 4
    bm.check_invariants()
    bm.free(1)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_prefix_cache_hit_only_for_same_tokens_and_adapter():
    bm = BlockManager(16, 4)
    tokens = list(range(13))
    assert bm.allocate(1, 13, adapter=("a", 1), token_ids=tokens)
    bm.commit(1, tokens, 13, ("a", 1))
    table = list(bm.block_table(1))
    # The last token is never covered: 13 tokens -> at most 3 full blocks (12 tokens).
    assert bm.find_cached_prefix(tokens, ("a", 1)) == table[:3]
    assert bm.find_cached_prefix(tokens[:12], ("a", 1)) == table[:2]
    assert bm.find_cached_prefix(tokens, ("b", 1)) == []  # another adapter
    assert bm.find_cached_prefix(tokens, ("a", 2)) == []  # same name, reloaded weights
    other = [99] + tokens[1:]
    assert bm.find_cached_prefix(other, ("a", 1)) == []  # a different first block breaks the chain
    bm.free(1)
    cached = bm.find_cached_prefix(tokens, ("a", 1))
    assert cached == table[:3]  # freed blocks keep their contents until reused
    assert bm.allocate(2, 13, cached_blocks=cached, adapter=("a", 1), token_ids=tokens)
    assert bm.block_table(2)[:3] == table[:3]
    assert bm.prefix_stats.hit_tokens == 12 and bm.prefix_stats.queried_tokens == 26
    bm.check_invariants()


def test_shared_blocks_are_ref_counted():
    bm = BlockManager(8, 4)
    tokens = list(range(9))
    bm.allocate(1, 9, adapter=None, token_ids=tokens)
    bm.commit(1, tokens, 9, None)
    cached = bm.find_cached_prefix(tokens, None)
    assert bm.allocate(2, 9, cached_blocks=cached, adapter=None, token_ids=tokens)
    shared = bm.block_table(1)[:2]
    assert bm.block_table(2)[:2] == shared
    bm.free(1)
    bm.check_invariants()
    assert bm.num_free_blocks == 8 - len(bm.block_table(2))  # shared blocks stay owned by 2
    bm.free(2)
    assert bm.num_free_blocks == 8


def test_lru_reuse_evicts_oldest_cached_blocks_first():
    bm = BlockManager(4, 2)
    a, b = [1, 2, 3], [4, 5, 6]
    for seq_id, tokens in ((1, a), (2, b)):
        bm.allocate(seq_id, 3, adapter=None, token_ids=tokens)
        bm.commit(seq_id, tokens, 3, None)
    bm.free(1)
    bm.free(2)
    # Freeing releases a sequence's last block first, so its cached prefix is reused last:
    # two new blocks take sequence 1's tail, then its cached first block.
    assert bm.allocate(3, 4)
    assert bm.find_cached_prefix(a, None) == []
    assert bm.find_cached_prefix(b, None) != []
    bm.check_invariants()


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    bm = BlockManager(8, 4)
    bm.allocate(1, 6)
    parent = bm.block_table(1)
    copy = bm.fork(1, 2, 6)
    child = bm.block_table(2)
    assert child[0] == parent[0] and child[1] != parent[1]
    assert copy == (parent[1], child[1])
    assert bm.fork(1, 3, 4) is None  # block-aligned: nothing to copy
    bm.check_invariants()
    for seq_id in (1, 2, 3):
        bm.free(seq_id)
    assert bm.num_free_blocks == 8
    with pytest.raises(ValueError):
        BlockManager(0, 4)


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    tokens = list(range(9))
    bm.allocate(1, 9, adapter=None, token_ids=tokens)
    bm.commit(1, tokens, 9, None)
    assert bm.find_cached_prefix(tokens, None) == []
