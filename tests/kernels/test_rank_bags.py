"""Rank-row and input-row bags (kernels/_rank_bags.py) against plain matmuls, and their index
width."""

from __future__ import annotations

import pytest
import torch

from mixserve.kernels._rank_bags import RankBags, bag_expand, bag_shrink


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shrink_and_expand_match_matmuls(dtype):
    gen = torch.Generator().manual_seed(0)
    groups, rank, in_features, out_features = 5, 4, 12, 10
    lora_a = torch.randn(groups, in_features, rank, generator=gen).to(dtype).mT  # pool layout
    lora_b = torch.randn(groups, rank, out_features, generator=gen).to(dtype).mT
    group_ids = torch.tensor([4, 0, 0, 3, 4, 1])  # any order
    x_rows = torch.randn(6, in_features, generator=gen).to(dtype)
    bags = RankBags(group_ids, groups)
    shrunk = bag_shrink(x_rows, lora_a, bags)  # [P, R]
    want = torch.stack(
        [lora_a[g].double() @ x.double() for g, x in zip(group_ids, x_rows, strict=True)]
    )
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(shrunk.double(), want, rtol=tol, atol=tol)
    coef = torch.randn(6, rank, generator=gen).to(dtype)
    expanded = bag_expand(coef, lora_b, bags.ids(rank), bags.offsets(rank))  # [P, out]
    want = torch.stack(
        [lora_b[g].double() @ c.double() for g, c in zip(group_ids, coef, strict=True)]
    )
    torch.testing.assert_close(expanded.double(), want, rtol=tol, atol=tol)


def test_indices_are_int32_until_they_would_overflow():
    small = RankBags(torch.tensor([0, 7, 7]), 8)
    assert small.ids(1536).dtype == small.offsets(1536).dtype == torch.int32
    assert small.ids(1536)[-1] == 7 * 1536 + 1535
    # 2**31 / 1536 groups: the last index of the largest group no longer fits in int32.
    big_group = 2**31 // 1536
    big = RankBags(torch.tensor([0, big_group]), big_group + 1)
    assert big.index_dtype(1536) == torch.int64
    assert big.index_dtype(8) == torch.int32
    assert RankBags(torch.tensor([], dtype=torch.int64), 4).index_dtype(8) == torch.int32
