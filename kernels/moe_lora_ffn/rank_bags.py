"""B products as weighted sums of B's rank rows (`embedding_bag`), for selected (row, expert) pairs.

The pool stores each B transposed, [.., R, out], so row (slot * E + e) * R + j of `rank_rows` is
column j of that expert's B, and ``B_g c = sum_j c[j] B_g[:, j]`` is one bag of R rows weighted by
c. Only the selected experts' B is read, in one call whatever the number of groups: on CPU that
beats a GEMM per (slot, expert) group, whose fixed cost dominates rank-8/16 products.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mixserve.kernels.moe_lora_ffn import ExpertLora


def rank_rows(lora: ExpertLora) -> torch.Tensor:
    """[S * E * R, out]: a view on the pool's storage (a copy for other layouts)."""
    return lora.lora_b.mT.reshape(-1, lora.lora_b.shape[2])


def rank_bag_ids(group_ids: torch.Tensor, rank: int) -> torch.Tensor:
    """[P * R]: the R rank rows of each pair's group (pair by pair)."""
    offsets = torch.arange(rank, device=group_ids.device)
    return (group_ids[:, None] * rank + offsets).flatten()


def pair_offsets(num_pairs: int, rank: int, device: torch.device) -> torch.Tensor:
    """[P]: one bag per pair."""
    return torch.arange(0, num_pairs * rank, rank, device=device)


def bag_expand(
    coef: torch.Tensor, lora: ExpertLora, bag_ids: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """out[b] = sum over the pairs p of bag b of B_g(p) coef[p]: coef [P, R] (pairs in bag_ids
    order), offsets [num_bags] into bag_ids. Returns [num_bags, out]."""
    return F.embedding_bag(
        bag_ids, rank_rows(lora), offsets, mode="sum", per_sample_weights=coef.flatten()
    )
