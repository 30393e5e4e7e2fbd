"""AdapterPool and PoolShape: sizing for mixed families, capacity refusals, load and clear."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from support.adapter_files import ALL_TARGETS, BaseDims, make_config, write_adapter
from support.harness import SeqSpec, make_runner, run_sequences
from support.tiny_models import tiny_config

from mixserve.adapters import (
    AdapterCapacityError,
    AdapterPool,
    AdapterWeights,
    PoolShape,
    SiteKind,
    load_adapter,
)
from mixserve.adapters.config_parser import parse_adapter_config
from mixserve.adapters.spec import AdapterSpec
from mixserve.kernels import RoutingRule
from mixserve.model import ArchConfig, DecoderModel, load_arch, load_model

DIMS = BaseDims.of(tiny_config("llama"))
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TOKENS = list(range(5, 19))


@pytest.fixture(scope="module")
def arch(tiny_llama_dir: str) -> ArchConfig:
    return load_arch(tiny_llama_dir)


@pytest.fixture(scope="module")
def model(tiny_llama_dir: str) -> DecoderModel:
    return load_model(tiny_llama_dir)


def _spec(strategy: str | None, *, r: int = 8, num_experts: int = 4, **extra: Any) -> AdapterSpec:
    targets = extra.pop("targets", ALL_TARGETS)
    config = make_config(strategy, r=r, alpha=16, num_experts=num_experts, targets=targets)
    config.update(extra)
    return parse_adapter_config(str(strategy), "adapter_config.json", config)


def _load(tmp_path: Any, arch: ArchConfig, strategy: str | None, name: str, **kw: Any):
    path = write_adapter(str(tmp_path / name), DIMS, strategy, **kw)
    return load_adapter(name, path, arch)


def _logits(model: DecoderModel, pool: AdapterPool | None, slots: dict[str, int]) -> torch.Tensor:
    adapter = next(iter(slots), None)
    seqs = [SeqSpec(TOKENS, adapter)]
    return run_sequences(make_runner(model, pool), seqs, slots, chunk_sizes=[10, 4])[0]


FULL = PoolShape(16, 4, 4, attn_routers=True, mlp_routers=True, ffn_router=True)


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
    weights = _load(tmp_path, arch, strategy, "big", **kw)
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
        shape.check_fits(_load(tmp_path, arch, strategy, f"fit-{strategy}"))
    shape = PoolShape.covering([_spec("loramoe")], arch.num_layers)
    shape.check_fits(_load(tmp_path, arch, "loramoe", "loramoe-only"))


def test_slot_out_of_range(tmp_path, arch):
    pool = AdapterPool(arch, FULL, 2, torch.float32, "cpu")
    weights = _load(tmp_path, arch, None, "a")
    for slot in (-1, 2):
        with pytest.raises(IndexError):
            pool.load(slot, weights)
    with pytest.raises(ValueError):
        AdapterPool(arch, FULL, 0, torch.float32, "cpu")


# load and clear


def _slot_state(pool: AdapterPool, slot: int) -> dict[str, Any]:
    state: dict[str, Any] = {"name": pool.names[slot], "act": pool.activations[slot]}
    for proj, stack in pool.stacks.sites.items():
        e = stack.num_experts
        state[f"{proj}.a"] = stack.lora_a[:, slot].clone()
        state[f"{proj}.b"] = stack.lora_b[:, slot].clone()
        state[f"{proj}.scale"] = stack.scale[:, slot * e : (slot + 1) * e].clone()
        if stack.router is not None:
            state[f"{proj}.router"] = stack.router[:, slot].clone()
        state[f"{proj}.kind"] = int(pool.site_kinds[proj][slot])
    if pool.stacks.ffn_router is not None:
        state["ffn_router"] = pool.stacks.ffn_router[:, slot].clone()
    state["ffn"] = bool(pool.ffn_slots[slot])
    for field in type(pool.routing).__dataclass_fields__:
        state[f"routing.{field}"] = getattr(pool.routing, field)[slot].item()
    return state


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def _assert_empty(pool: AdapterPool, slot: int) -> None:
    for key, value in _slot_state(pool, slot).items():
        if isinstance(value, torch.Tensor):
            assert not value.any(), key
        else:
            assert not value, key


@pytest.mark.parametrize("strategy", [None, "mixlora", "loramoe", "dynmole"])
def test_cleared_slot_contributes_nothing(tmp_path, arch, model, strategy: str | None):
    pool = AdapterPool(arch, FULL, 2, torch.float32, "cpu")
    pool.load(0, _load(tmp_path, arch, "mola", "other", seed=2))
    pool.load(1, _load(tmp_path, arch, strategy, "a", seed=1))
    base = _logits(model, None, {})
    assert not torch.allclose(_logits(model, pool, {"a": 1}), base)
    other = _logits(model, pool, {"other": 0})
    pool.clear(1)
    _assert_empty(pool, 1)
    assert torch.equal(_logits(model, pool, {"a": 1}), base)
    assert torch.equal(_logits(model, pool, {"other": 0}), other)  # the neighbour is kept


def test_a_fresh_slot_is_empty(arch):
    pool = AdapterPool(arch, FULL, 3, torch.float32, "cpu")
    for slot in range(3):
        _assert_empty(pool, slot)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("dynmole", {"r": 16, "num_experts": 4}), ("mixlora-dynamic", {"num_experts": 2})),
        (("mixlora", {"r": 16}), ("mola", {"num_experts": 3, "targets": ("q_proj", "up_proj")})),
        (("mixlora-switch", {}), (None, {"targets": ("v_proj", "down_proj")})),
        (("loramoe", {"r": 16}), ("dynmole", {"num_experts": 2})),
    ],
    ids=["dynmole->mixlora-dynamic", "mixlora->mola", "switch->lora", "loramoe->dynmole"],
)
def test_reloading_a_slot_replaces_the_adapter_fully(
    tmp_path, arch, model, first: tuple[str | None, dict], second: tuple[str | None, dict]
):
    a = _load(tmp_path, arch, first[0], "first", seed=3, **first[1])
    b = _load(tmp_path, arch, second[0], "second", seed=4, **second[1])
    fresh = AdapterPool(arch, FULL, 2, torch.float32, "cpu")
    fresh.load(0, b)
    reused = AdapterPool(arch, FULL, 2, torch.float32, "cpu")
    reused.load(0, a)
    reused.load(0, b)
    _assert_same(_slot_state(fresh, 0), _slot_state(reused, 0))
    assert torch.equal(_logits(model, reused, {"second": 0}), _logits(model, fresh, {"second": 0}))


def test_routing_parameters_follow_the_loaded_adapter(tmp_path, arch):
    pool = AdapterPool(arch, FULL, 1, torch.float32, "cpu")
    pool.load(0, _load(tmp_path, arch, "dynmole", "d", entropy_threshold=0.7, keep_top_k=3))
    r = pool.routing
    assert int(r.rule[0]) == int(RoutingRule.DYNMOLE)
    assert float(r.entropy_threshold[0]) == pytest.approx(0.7)
    assert int(r.keep_top_k[0]) == 3
    assert float(r.top_p[0]) == pytest.approx(0.75)
    pool.load(0, _load(tmp_path, arch, "mixlora", "m", top_k=3))
    assert int(r.rule[0]) == int(RoutingRule.TOP_K)
    assert int(r.top_k[0]) == 3 and int(r.num_experts[0]) == 4
    for field in ("top_p", "entropy_threshold", "entropy_index", "entropy_eps", "keep_top_k"):
        assert float(getattr(r, field)[0]) == 0.0, field
    assert pool.names == ["m"]
    pool.load(0, _load(tmp_path, arch, None, "l"))
    assert int(r.rule[0]) == 0 and not bool(pool.ffn_slots[0])
    assert pool.activations == [None]


def test_site_kinds_and_activation_per_slot(tmp_path, arch):
    pool = AdapterPool(arch, FULL, 3, torch.float32, "cpu")
    mix = _load(tmp_path, arch, "mixlora", "mix", targets=("q_proj",) + MLP)
    gelu = _load(tmp_path, arch, "mixlora", "gelu", act_fn="gelu", targets=MLP)
    mola = _load(tmp_path, arch, "mola", "mola", targets=("k_proj", "down_proj"))
    for slot, weights in enumerate((mix, gelu, mola)):
        pool.load(slot, weights)
    kinds = {p: pool.site_kinds[p].tolist() for p in ATTN + MLP}
    assert kinds["q_proj"] == [SiteKind.LORA, SiteKind.NONE, SiteKind.NONE]
    assert kinds["k_proj"] == [SiteKind.NONE, SiteKind.NONE, SiteKind.ROUTED]
    assert kinds["gate_proj"] == [SiteKind.FFN_EXPERT, SiteKind.FFN_EXPERT, SiteKind.NONE]
    assert kinds["down_proj"] == [SiteKind.FFN_EXPERT, SiteKind.FFN_EXPERT, SiteKind.ROUTED]
    assert pool.ffn_slots.tolist() == [True, True, False]
    assert pool.activations == [arch.hidden_act, "gelu", None]
    assert pool.names == ["mix", "gelu", "mola"]


def test_smaller_adapter_is_zero_padded(tmp_path, arch):
    pool = AdapterPool(arch, FULL, 1, torch.float32, "cpu")
    small: AdapterWeights = _load(tmp_path, arch, "loramoe", "s", r=8, num_experts=2)
    pool.load(0, small)
    stack = pool.stacks.sites["up_proj"]
    site = small.sites["up_proj"]
    assert torch.equal(stack.lora_a[:, 0, :2, :8], site.lora_a)
    assert not stack.lora_a[:, 0, 2:].any() and not stack.lora_a[:, 0, :, 8:].any()
    assert not stack.lora_b[:, 0, :, :, 8:].any()
    assert stack.router is not None and site.router is not None
    assert torch.equal(stack.router[:, 0, :2], site.router)
    assert not stack.router[:, 0, 2:].any()
    assert torch.equal(stack.scale[:, :2], site.scale) and not stack.scale[:, 2:].any()
