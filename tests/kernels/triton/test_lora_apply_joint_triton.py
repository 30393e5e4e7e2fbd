"""lora_apply_joint through Triton (one lora_apply per site, each with its own group ranks)
against the torch oracle of per-site lora_apply."""

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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["decode", "runs_and_rest"])
def test_joint_sites_through_triton(layout, dtype, kernel_device):
    gen = torch.Generator().manual_seed(5)
    sites = joint_sites(dtype, gen)
    tensors = joint_segments(layout, gen)
    num_rows = int(tensors[0].max()) + 1
    x = torch.randn(num_rows, JOINT_HIDDEN, generator=gen).to(dtype)
    base = torch.randn(num_rows, sum(b.shape[1] for b in sites.lora_bs), generator=gen).to(dtype)
    want = base.clone()
    per_site(x, sites, Segments(*tensors), want)

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(kernel_device)

    storage_views = [dev(a.mT.contiguous()) for a in sites.lora_as]  # re-joined on the device
    storage = torch.stack(storage_views, dim=2)  # [G, in, n, R]
    lora_as = [storage[:, :, i].mT for i in range(len(storage_views))]
    joint = joint_lora_a(*lora_as)
    assert joint is not None
    got = dev(base)
    lora_apply_joint(
        dev(x),
        joint,
        [dev(b) for b in sites.lora_bs],
        Segments(*(dev(t) for t in tensors)),
        got,
        group_scales=[dev(s) for s in sites.scales],
        group_ranks=[dev(r) for r in sites.group_ranks],
    )
    scale = float(want.abs().max())
    assert float((got.cpu().float() - want.float()).abs().max()) / scale < TOL[dtype]
