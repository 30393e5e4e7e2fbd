"""LoRA products as weighted sums of weight rows (`embedding_bag`), one bag per assignment.

The adapter pool stores each B transposed, [.., R, out], so row g * R + j of `rank_rows` is
column j of group g's B (g = slot * E + expert), and ``B_g c = sum_j c[j] B_g[:, j]`` is one bag of
R rows weighted by c. Likewise A is stored [.., in, R], so ``A_g x = sum_h x[h] A_g[:, h]`` is one
bag of `in` rows of R values weighted by x (`bag_shrink`). Only the groups in use are read, in one
call whatever their number: on CPU that beats a GEMM per group, whose fixed cost dominates rank-8/16
products, as long as each group has few assignments (the bags read a group's weights once per
assignment). The MoE FFN reference and lora_expand's reference use them; bench/RESULTS.md,
sessions 13 and 15.
"""

from __future__ import annotations

import functools

import torch

# Bags read a group's weights once per assignment, a GEMM once per group: past this many
# assignments per group the GEMM per group is the cheaper. Measured on the AMD EPYC VM (2
# threads, 2026-12-06) over the whole MoE FFN of 30 layers of SmolLM2's shape, r = 8, E = 4,
# top-2, each layer's weights out of cache (bench/RESULTS.md, session 26): bags against GEMM
# shrinks took 0.70x the time at 6 assignments per group, 0.75-0.80x at 8-10, 0.88x at 16, 0.93x
# at 21, 0.97x at 29. (Shrinks timed alone, with x fixed, put the crossover elsewhere: the FFN's
# own temporaries share the cache with the bags' reads.) On the Intel Xeon VM (session 27,
# pairs in token order, alternating in one process) the crossover comes sooner: 0.99x at 4
# pairs per group, 0.97x at 8, 1.0x at 16, 1.12x at 32, and 1.14x over a real 1,024-token step
# (23 pairs per group on average, up to 60). 20 sits between the two machines' crossovers.
MAX_BAG_ASSIGNMENTS_PER_GROUP = 20


def bag_shrink(x_rows: torch.Tensor, lora_a: torch.Tensor, bags: RankBags) -> torch.Tensor:
    """s[p] = lora_a[g(p)] @ x_rows[p] for the assignments of bags (g = bags.group_ids):
    x_rows [P, in] (one row per assignment), lora_a [G, R, in]: a view of the pool's
    [G, in, R] storage, else copied into it. Returns [P, R] in lora_a's dtype."""
    in_features = x_rows.shape[1]
    input_rows = lora_a.mT.reshape(-1, lora_a.shape[-2])  # [G * in, R]
    weights = x_rows.to(input_rows.dtype).flatten()
    return weighted_bag_sums(input_rows, bags.ids(in_features), bags.offsets(in_features), weights)


def rank_rows(lora_b: torch.Tensor) -> torch.Tensor:
    """lora_b [..., out, R] -> [G * R, out] (G = the leading dims): a view on the pool's storage,
    a copy for other layouts."""
    return lora_b.mT.reshape(-1, lora_b.shape[-2])


class RankBags:
    """Bag indices for one list of assignments (group_ids [P], each below num_groups: the
    weight tables' group count), built once per row width and shared by every projection that
    shrinks or expands the same assignments."""

    def __init__(self, group_ids: torch.Tensor, num_groups: int) -> None:
        self.group_ids = group_ids
        self.num_groups = num_groups  # a bound from the tables' shape: no read of group_ids
        self._ids: dict[int, torch.Tensor] = {}
        self._offsets: dict[int, torch.Tensor] = {}

    def index_dtype(self, width: int) -> torch.dtype:
        """int32 where every index and offset of ids(width) fits, else int64 (embedding_bag
        takes either). Building ids is a broadcast add over [P, width], ~4x faster in int32 on
        CPU: 0.27 against 1.07 ms for 2,000 pairs at width 1536 (bench/RESULTS.md, session
        27)."""
        largest = max(self.num_groups, self.group_ids.shape[0]) * width
        return torch.int32 if largest < 2**31 else torch.int64

    def ids(self, width: int) -> torch.Tensor:
        """[P * width]: rows g * width .. g * width + width - 1 of each assignment's group g,
        assignment by assignment (width R: B's rank rows; width `in`: A's input rows)."""
        if width not in self._ids:
            dtype = self.index_dtype(width)
            first_rows = self.group_ids.to(dtype)[:, None] * width  # [P, 1]
            offsets = _row_offsets(width, dtype, self.group_ids.device)
            self._ids[width] = (first_rows + offsets).view(-1)
        return self._ids[width]

    def offsets(self, width: int) -> torch.Tensor:
        """[P] offsets into ids(width): one bag per assignment."""
        if width not in self._offsets:
            count = self.group_ids.shape[0]
            self._offsets[width] = torch.arange(
                0,
                count * width,
                width,
                dtype=self.index_dtype(width),
                device=self.group_ids.device,
            )
        return self._offsets[width]


@functools.cache
def _row_offsets(width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[width] 0 .. width - 1, shared read-only by every RankBags (one per width and dtype)."""
    return torch.arange(width, dtype=dtype, device=device)


def weighted_bag_sums(
    table: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """[num_bags, width]: out[b] = sum of weights[i] * table[ids[i]] over bag b's entries
    (weights None: plain sums; an empty bag gives zeros).

    torch.embedding_bag rather than F.embedding_bag: the functional's argument checks cost
    about ten Python-level calls per use, a measurable share of a decode step's hundreds of bag
    calls (bench/RESULTS.md, session 17); every bag here is well formed by construction.
    """
    sums, _, _, _ = torch.embedding_bag(table, ids, offsets, False, 0, False, weights, False, None)
    return sums


def bag_expand(
    coef: torch.Tensor, lora_b: torch.Tensor, bag_ids: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """out[b] = sum over the assignments p of bag b of B_g(p) coef[p]: coef [P, R] (assignments
    in bag_ids order), lora_b [..., out, R], offsets [num_bags] into bag_ids. Returns
    [num_bags, out]."""
    return weighted_bag_sums(rank_rows(lora_b), bag_ids, offsets, coef.flatten())
