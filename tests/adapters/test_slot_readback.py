"""slot_readback: an adapter read back out of its slot is the adapter loaded there, bit for bit,
for every family's tensors (routers, MixLoRA's FFN router, padded ranks and experts)."""

from __future__ import annotations

import pytest
import torch
from support.pager_helpers import SHAPE, write

from mixserve.adapters import AdapterPool, AdapterWeights, load_adapter
from mixserve.adapters.slot_readback import read_slot, skeleton, stored_exactly
from mixserve.model import ArchConfig


def _tensors(weights: AdapterWeights) -> dict[str, torch.Tensor]:
    out = {} if weights.ffn_router is None else {"ffn_router": weights.ffn_router}
    for proj, site in weights.sites.items():
        out.update({f"{proj}.a": site.lora_a, f"{proj}.b": site.lora_b, f"{proj}.s": site.scale})
        if site.router is not None:
            out[f"{proj}.router"] = site.router
    return out


@pytest.mark.parametrize("strategy", [None, "mixlora", "mixlora-dynamic", "dynmole", "mola"])
def test_read_back_equals_what_was_loaded(arch: ArchConfig, tmp_path, strategy):
    weights = load_adapter("x", write(tmp_path, "x", strategy, r=4, num_experts=3), arch)
    pool = AdapterPool(arch, SHAPE, 3, torch.float32, "cpu")
    pool.load(2, weights)
    like = skeleton(weights)
    assert all(t.is_meta for t in _tensors(like).values())
    assert stored_exactly(pool, weights)
    got = read_slot(pool, 2, like)
    assert (got.spec, got.files, got.sites.keys()) == (
        weights.spec,
        weights.files,
        weights.sites.keys(),
    )
    want = _tensors(weights)
    for key, tensor in _tensors(got).items():
        assert tensor.device.type == "cpu" and tensor.is_contiguous(), key
        assert torch.equal(tensor, want[key]), key
    for proj, site in got.sites.items():
        assert site.kind is weights.sites[proj].kind
    # A copy, not a view: the slot may be overwritten and the read-back stays.
    pool.clear(2)
    assert all(torch.equal(t, want[k]) for k, t in _tensors(got).items())


def test_a_lower_precision_pool_is_not_exact_and_names_are_checked(arch: ArchConfig, tmp_path):
    weights = load_adapter("x", write(tmp_path, "x", "mixlora"), arch)
    pool = AdapterPool(arch, SHAPE, 2, torch.bfloat16, "cpu")
    assert not stored_exactly(pool, weights)  # fp32 A and B in a bf16 pool
    pool.load(0, weights)
    with pytest.raises(ValueError, match="slot 1 holds None, not 'x'"):
        read_slot(pool, 1, skeleton(weights))
