"""LoRA B products as weighted sums of B's rank rows (`embedding_bag`), one bag per assignment.

The adapter pool stores each B transposed, [.., R, out], so row g * R + j of `rank_rows` is
column j of group g's B (g = slot * E + expert), and ``B_g c = sum_j c[j] B_g[:, j]`` is one bag of
R rows weighted by c. Only the groups in use are read, in one call whatever their number: on CPU
that beats a GEMM per group, whose fixed cost dominates rank-8/16 products (the MoE FFN reference
and lora_expand's reference use it; bench/RESULTS.md, session 13).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rank_rows(lora_b: torch.Tensor) -> torch.Tensor:
    """lora_b [..., out, R] -> [G * R, out] (G = the leading dims): a view on the pool's storage,
    a copy for other layouts."""
    return lora_b.mT.reshape(-1, lora_b.shape[-2])


class RankBags:
    """Bag indices for one list of assignments (group_ids [P]), built once per rank and shared
    by every projection that expands the same assignments."""

    def __init__(self, group_ids: torch.Tensor) -> None:
        self.group_ids = group_ids
        self._ids: dict[int, torch.Tensor] = {}

    def ids(self, rank: int) -> torch.Tensor:
        """[P * R]: the R rank rows of each assignment's group, assignment by assignment."""
        if rank not in self._ids:
            offsets = torch.arange(rank, device=self.group_ids.device)
            self._ids[rank] = (self.group_ids[:, None] * rank + offsets).flatten()
        return self._ids[rank]

    def per_assignment(self, rank: int) -> torch.Tensor:
        """[P] offsets: one bag per assignment."""
        count = self.group_ids.shape[0]
        return torch.arange(0, count * rank, rank, device=self.group_ids.device)


def bag_expand(
    coef: torch.Tensor, lora_b: torch.Tensor, bag_ids: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """out[b] = sum over the assignments p of bag b of B_g(p) coef[p]: coef [P, R] (assignments
    in bag_ids order), lora_b [..., out, R], offsets [num_bags] into bag_ids. Returns
    [num_bags, out]."""
    return F.embedding_bag(
        bag_ids, rank_rows(lora_b), offsets, mode="sum", per_sample_weights=coef.flatten()
    )
