"""KV block accounting: ref-counted block ids and a prefix cache keyed by adapter (pure Python).

Invariants:
- a block is either owned (ref_count > 0, listed in the block tables of ref_count sequences) or
  free (ref_count == 0, in the free queue); never both, never neither;
- a full block's key chains its parent's key, its tokens and the adapter identity, so two
  adapters (or two weight versions of one name) never share KV for the same tokens;
- free blocks keep their cached contents until reused, oldest-freed reused first (LRU).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

# (parent key hash, tokens of the block, adapter identity)
BlockKey = tuple[int, tuple[int, ...], Hashable]


@dataclass(slots=True)
class _Block:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None  # set once the block is full and cached


@dataclass(slots=True)
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("need at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockKey, int] = {}
        self._tables: dict[int, list[int]] = {}  # seq_id -> block ids
        self._num_hashed: dict[int, int] = {}  # seq_id -> leading full blocks already cached
        self._last_key: dict[int, BlockKey | None] = {}  # seq_id -> key of its last cached block
        self.prefix_stats = PrefixCacheStats()

    # -- queries -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def block_table(self, seq_id: int) -> list[int]:
        return self._tables[seq_id]

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _key(self, parent: BlockKey | None, tokens: Sequence[int], adapter: Hashable) -> BlockKey:
        return (hash(parent), tuple(tokens), adapter)

    def find_cached_prefix(self, token_ids: Sequence[int], adapter: Hashable) -> list[int]:
        """Block ids of the longest cached run of full blocks starting at token 0, never covering
        the last token (its logits must be computed). No side effects."""
        if not self.enable_prefix_caching:
            return []
        found: list[int] = []
        parent: BlockKey | None = None
        bs = self.block_size
        for start in range(0, len(token_ids) - 1 - (bs - 1), bs):
            key = self._key(parent, token_ids[start : start + bs], adapter)
            block_id = self._cached.get(key)
            if block_id is None:
                break
            found.append(block_id)
            parent = key
        return found

    # -- allocation ----------------------------------------------------------------------------

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.key is not None:  # reusing an evicted cached block
            del self._cached[block.key]
            block.key = None
        block.ref_count = 1
        return block_id

    def allocate(
        self,
        seq_id: int,
        num_tokens: int,
        *,
        cached_blocks: Sequence[int] = (),
        adapter: Hashable = None,
        token_ids: Sequence[int] = (),
    ) -> bool:
        """Give seq_id blocks for num_tokens tokens. A new sequence first takes `cached_blocks`
        (its cached prefix, from find_cached_prefix). False, and nothing changed, if too few
        blocks are free."""
        table = self._tables.get(seq_id)
        new_seq = table is None
        if new_seq:
            table = []
        reusable = [b for b in cached_blocks if self._blocks[b].ref_count == 0] if new_seq else []
        have = len(table) + (len(cached_blocks) if new_seq else 0)
        needed = max(0, self.blocks_needed(num_tokens) - have)
        if needed > len(self._free) - len(reusable):
            return False
        if new_seq:
            for block_id in cached_blocks:
                self._take(block_id)
            table.extend(cached_blocks)
            self._tables[seq_id] = table
            self._num_hashed[seq_id] = len(cached_blocks)
            self._last_key[seq_id] = self._blocks[cached_blocks[-1]].key if cached_blocks else None
            if self.enable_prefix_caching and token_ids:
                self.prefix_stats.queried_tokens += len(token_ids)
                self.prefix_stats.hit_tokens += len(cached_blocks) * self.block_size
        table.extend(self._pop_free() for _ in range(needed))
        return True

    def commit(
        self, seq_id: int, token_ids: Sequence[int], num_computed: int, adapter: Hashable
    ) -> None:
        """Enter the sequence's blocks now full of computed tokens into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[seq_id]
        bs = self.block_size
        num_full = min(num_computed // bs, len(table))
        parent = self._last_key[seq_id]
        for index in range(self._num_hashed[seq_id], num_full):
            key = self._key(parent, token_ids[index * bs : (index + 1) * bs], adapter)
            block = self._blocks[table[index]]
            if block.key is None and key not in self._cached:
                block.key = key
                self._cached[key] = block.block_id
            parent = key
        self._num_hashed[seq_id] = max(self._num_hashed[seq_id], num_full)
        self._last_key[seq_id] = parent

    def fork(self, parent_id: int, child_id: int, num_tokens: int) -> tuple[int, int] | None:
        """The child shares the parent's blocks holding num_tokens tokens; a partly filled last
        block is copied (returns (src, dst) for the runner) since both will write into it.
        Needs one free block in that case (call can_fork first)."""
        parent = self._tables[parent_id]
        full, partial = divmod(num_tokens, self.block_size)
        shared = parent[:full]
        for block_id in shared:
            self._take(block_id)
        table = list(shared)
        copy = None
        if partial:
            dst = self._pop_free()
            table.append(dst)
            copy = (parent[full], dst)
        self._tables[child_id] = table
        self._num_hashed[child_id] = min(self._num_hashed[parent_id], full)
        self._last_key[child_id] = (
            self._blocks[shared[self._num_hashed[child_id] - 1]].key
            if self._num_hashed[child_id]
            else None
        )
        return copy

    def can_fork(self, num_tokens: int, num_children: int) -> bool:
        return (num_tokens % self.block_size == 0) or len(self._free) >= num_children

    def free(self, seq_id: int) -> None:
        """Release every block of the sequence (cached contents stay reusable until evicted)."""
        table = self._tables.pop(seq_id, None)
        self._num_hashed.pop(seq_id, None)
        self._last_key.pop(seq_id, None)
        if table is None:
            return
        # Later blocks first, so a sequence's prefix blocks are the last to be evicted.
        for block_id in reversed(table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._free[block_id] = None

    def check_invariants(self) -> None:
        """Raise AssertionError when accounting is inconsistent (used by tests)."""
        owners: dict[int, int] = {}
        for table in self._tables.values():
            for block_id in table:
                owners[block_id] = owners.get(block_id, 0) + 1
        for block in self._blocks:
            refs = owners.get(block.block_id, 0)
            assert block.ref_count == refs, (
                f"block {block.block_id}: ref {block.ref_count} != {refs}"
            )
            assert (block.block_id in self._free) == (refs == 0), (
                f"block {block.block_id} free state"
            )
            if block.key is not None:
                assert self._cached.get(block.key) == block.block_id
        assert len(self._cached) == sum(b.key is not None for b in self._blocks)
