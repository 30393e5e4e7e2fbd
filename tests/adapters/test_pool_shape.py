"""PoolShape: sizing for mixed families (covering), and the capacity refusals of check_fits and
of AdapterPool.load."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from support.adapter_files import ALL_TARGETS, make_config
from support.pool_helpers import FULL, load_tiny

from mixserve.adapters import AdapterCapacityError, AdapterPool, PoolShape
from mixserve.adapters.config_parser import parse_adapter_config
from mixserve.adapters.spec import AdapterSpec


def _spec(strategy: str | None, *, r: int = 8, num_experts: int = 4, **extra: Any) -> AdapterSpec:
    targets = extra.pop("targets", ALL_TARGETS)
    config = make_config(strategy, r=r, alpha=16, num_experts=num_experts, targets=targets)
    config.update(extra)
    return parse_adapter_config(str(strategy), "adapter_config.json", config)


# PoolShape.covering


def test_covering_nothing_is_the_smallest_shape():
    assert PoolShape.covering([], 2) == PoolShape(8, 1, 1, False, False, False)


def test_covering_plain_lora_needs_no_experts_or_routers():
    shape = PoolShape.covering([_spec(None, r=12)], 2)
    assert shape == PoolShape(16, 1, 1, False, False, False)  # rank rounded up to 8s


def test_covering_mixlora_needs_mlp_experts_and_the_ffn_router():
    shape = PoolShape.covering([_spec("mixlora", num_experts=6)], 2)
    assert shape == PoolShape(8, 1, 6, False, False, True)


def test_covering_mixlora_expert_lora_rank():
    shape = PoolShape.covering([_spec("mixlora", expert_lora={"r": 24})], 2)
    assert shape.max_rank == 24


def test_covering_plugin_families():
    assert PoolShape.covering([_spec("loramoe", num_experts=3)], 2) == PoolShape(
        8, 1, 3, False, True, False
    )
    assert PoolShape.covering([_spec("mola", num_experts=5, targets=("k_proj",))], 2) == (
        PoolShape(8, 5, 1, True, False, False)
    )
    assert PoolShape.covering([_spec("dynmole", num_experts=2)], 2) == PoolShape(
        8, 2, 2, True, True, False
    )


def test_covering_mixed_families_takes_the_maximum_of_each():
    specs = [
        _spec(None, r=32, targets=("q_proj",)),
        _spec("mixlora", num_experts=8),
        _spec("loramoe", num_experts=3),
        _spec("mola", num_experts=6, targets=("v_proj", "o_proj")),
        _spec("mixlora-dynamic", num_experts=2, expert_lora={"r": 40}),
    ]
    shape = PoolShape.covering(specs, 2)
    assert shape == PoolShape(40, 6, 8, True, True, True)
    assert shape.experts("k_proj") == 6 and shape.experts("down_proj") == 8
    assert shape.has_router("o_proj") and shape.has_router("gate_proj")


def test_covering_rank_pattern_uses_the_largest_layer_rank():
    spec = _spec(None, r=8, rank_pattern={"layers.1.self_attn.q_proj": 20})
    assert PoolShape.covering([spec], 2).max_rank == 24
    # Layer 1 does not exist on a 1-layer base.
    assert PoolShape.covering([spec], 1).max_rank == 8


def test_covering_min_rank():
    assert PoolShape.covering([_spec(None, r=8)], 2, min_rank=32).max_rank == 32


@pytest.mark.parametrize(
    "args",
    [(12, 1, 1, False, False, False), (0, 1, 1, False, False, False), (8, 0, 1, *[False] * 3)],
)
def test_invalid_pool_shapes(args: tuple[Any, ...]):
    with pytest.raises(ValueError):
        PoolShape(*args)


# check_fits and the pool's refusals


@pytest.mark.parametrize(
    ("strategy", "kw", "shape", "match"),
    [
        (None, {"r": 24}, FULL, "rank 24 exceeds the pool's max rank 16"),
        ("mixlora", {"expert_r": 32}, FULL, "gate_proj: rank 32 exceeds"),
        ("mixlora", {"num_experts": 5}, FULL, "gate_proj: 5 experts exceed the pool's 4"),
        (
            "mola",
            {"num_experts": 4},
            PoolShape(16, 2, 4, True, True, False),
            "q_proj: 4 experts exceed the pool's 2",
        ),
        (
            "loramoe",
            {},
            PoolShape(16, 4, 4, True, False, True),
            "gate_proj: the pool holds no routers",
        ),
        (
            "mola",
            {"targets": ("k_proj",)},
            PoolShape(16, 4, 4, False, True, True),
            "k_proj: the pool holds no routers",
        ),
        (
            "mixlora",
            {},
            PoolShape(16, 4, 4, True, True, False),
            "no MixLoRA router",
        ),
    ],
    ids=["rank", "expert-rank", "mlp-experts", "attn-experts", "mlp-router", "attn-router", "ffn"],
)
def test_check_fits_refusals(
    tmp_path, arch, strategy: str | None, kw: dict[str, Any], shape: PoolShape, match: str
):
    if "expert_r" in kw:
        kw = {**kw, "expert_lora": {"r": kw["expert_r"]}}
    weights = load_tiny(tmp_path, arch, strategy, "big", **kw)
    with pytest.raises(AdapterCapacityError, match=match) as info:
        shape.check_fits(weights)
    assert info.value.adapter == "big" and "adapter 'big'" in str(info.value)
    pool = AdapterPool(arch, shape, 2, torch.float32, "cpu")
    with pytest.raises(AdapterCapacityError, match=match):
        pool.load(1, weights)
    assert pool.names == [None, None]


def test_exactly_fitting_adapters_are_accepted(tmp_path, arch):
    shape = PoolShape(8, 4, 4, True, True, True)
    for strategy in (None, "mixlora", "loramoe", "mola", "dynmole"):
        shape.check_fits(load_tiny(tmp_path, arch, strategy, f"fit-{strategy}"))
    shape = PoolShape.covering([_spec("loramoe")], arch.num_layers)
    shape.check_fits(load_tiny(tmp_path, arch, "loramoe", "loramoe-only"))


def test_slot_out_of_range(tmp_path, arch):
    pool = AdapterPool(arch, FULL, 2, torch.float32, "cpu")
    weights = load_tiny(tmp_path, arch, None, "a")
    for slot in (-1, 2):
        with pytest.raises(IndexError):
            pool.load(slot, weights)
    with pytest.raises(ValueError):
        AdapterPool(arch, FULL, 0, torch.float32, "cpu")
