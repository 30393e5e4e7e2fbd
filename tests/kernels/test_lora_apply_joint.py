"""lora_apply_joint (sites sharing rows and segments, q/k/v) against lora_apply per site on the
output's column slices, for each row pattern: decode rows (also with a popular group), row runs
(prefill chunks) with and without a rest, and groups of many rows that are no runs. x is
gathered and shrunk once for all sites in every case, padded or as bags."""

from __future__ import annotations

import pytest
import torch
from support.lora_cases import (
    DTYPES,
    JOINT_HIDDEN,
    TOL,
    joint_segments,
    joint_sites,
    per_site,
)

from mixserve.kernels import Segments, joint_lora_a, lora_apply_joint
from mixserve.kernels.lora import reference

# The torch reference's strategies through the wrappers (compiled CPU kernel: test_lora_cpu.py).
pytestmark = pytest.mark.usefixtures("reference_kernels")


LAYOUTS = ["decode", "decode_popular", "runs", "runs_and_rest", "runs_and_many_rows", "many_rows"]


def joint_case(layout: str, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    sites = joint_sites(dtype, gen)
    tensors = joint_segments(layout, gen)
    num_rows = int(tensors[0].max()) + 3  # rows past the last assignment stay untouched
    x = torch.randn(num_rows, JOINT_HIDDEN, generator=gen).to(dtype)
    base = torch.randn(num_rows, sum(b.shape[1] for b in sites.lora_bs), generator=gen).to(dtype)
    want = base.clone()
    per_site(x, sites, Segments(*tensors), want)
    return sites, tensors, x, base, want


def assert_joint_matches(got, want, base, dtype) -> None:
    scale = float(want.abs().max())
    assert float((got.float() - want.float()).abs().max()) / scale < TOL[dtype]
    assert torch.equal(got[-2:], base[-2:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_joint_sites_equal_each_site_on_its_columns(layout, dtype, monkeypatch):
    sites, tensors, x, base, want = joint_case(layout, dtype, 3)
    calls: dict[str, int] = {"bag_shrink": 0, "_apply_padded": 0}
    for attr in calls:
        real = getattr(reference, attr)

        def counting(*a, real=real, attr=attr, **k):
            calls[attr] += 1
            return real(*a, **k)

        monkeypatch.setattr(reference, attr, counting)
    got = base.clone()
    joint = joint_lora_a(*sites.lora_as)
    assert joint is not None
    lora_apply_joint(x, joint, sites.lora_bs, Segments(*tensors), got, group_scales=sites.scales)
    assert_joint_matches(got, want, base, dtype)
    # The rows outside runs take one strategy, which shrinks x once for all sites: padded where
    # the groups are even (decode rows), bags otherwise (the rest after a chunk: 5 rows over a
    # grid of 12 groups).
    expected = {"decode": "_apply_padded", "runs": None}
    want_strategy = expected.get(layout, "bag_shrink")
    assert calls == {attr: int(attr == want_strategy) for attr in calls}


def test_joint_sites_refuse_mismatched_widths():
    sites, tensors, x, base, _ = joint_case("decode", torch.float32, 3)
    joint = joint_lora_a(*sites.lora_as)
    assert joint is not None
    wider = torch.zeros(base.shape[0], base.shape[1] + 1)
    with pytest.raises(ValueError, match="joint sites"):
        lora_apply_joint(
            x, joint, sites.lora_bs, Segments(*tensors), wider, group_scales=sites.scales
        )


def test_joint_view_only_for_consecutive_slices_of_one_storage():
    storage = torch.randn(2, 5, 10, 3, 8)  # [S, E, in, n, R]
    q, k, v = (storage[..., i, :].mT for i in range(3))  # [S, E, R, in]
    joint = joint_lora_a(q, k, v)
    assert joint is not None and joint.shape == (10, 24, 10)
    for i, part in enumerate((q, k, v)):
        assert torch.equal(joint[:, 8 * i : 8 * (i + 1)], part.flatten(0, 1))
    assert joint_lora_a(q, k) is None  # two of a storage of three slices
    assert joint_lora_a(q, v, k) is None  # out of order
    assert joint_lora_a(q, k, v.contiguous()) is None
