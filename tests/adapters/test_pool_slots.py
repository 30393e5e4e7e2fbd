"""AdapterPool slots: load and clear, reuse of a slot, routing parameters, site kinds and
activations per slot, zero padding."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from support.harness import SeqSpec, make_runner, run_sequences
from support.pool_helpers import FULL, load_tiny

from mixserve.adapters import AdapterPool, AdapterWeights, SiteKind
from mixserve.kernels import RoutingRule
from mixserve.model import DecoderModel, load_model

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TOKENS = list(range(5, 19))


@pytest.fixture(scope="module")
def model(tiny_llama_dir: str) -> DecoderModel:
    return load_model(tiny_llama_dir)


def _logits(model: DecoderModel, pool: AdapterPool | None, slots: dict[str, int]) -> torch.Tensor:
    adapter = next(iter(slots), None)
    seqs = [SeqSpec(TOKENS, adapter)]
    return run_sequences(make_runner(model, pool), seqs, slots, chunk_sizes=[10, 4])[0]


# load and clear


def _slot_state(pool: AdapterPool, slot: int) -> dict[str, Any]:
    state: dict[str, Any] = {"name": pool.names[slot], "act": pool.activations[slot]}
    for proj, stack in pool.stacks.sites.items():
        e = stack.num_experts
        state[f"{proj}.a"] = stack.lora_a[:, slot].clone()
        state[f"{proj}.b"] = stack.lora_b[:, slot].clone()
        state[f"{proj}.scale"] = stack.scale[:, slot * e : (slot + 1) * e].clone()
        state[f"{proj}.ranks"] = stack.group_ranks[slot * e : (slot + 1) * e].clone()
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
    pool.load(0, load_tiny(tmp_path, arch, "mola", "other", seed=2))
    pool.load(1, load_tiny(tmp_path, arch, strategy, "a", seed=1))
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
        # the second fills every site's A and B whole, so load skips zeroing them first
        (("mixlora", {"r": 16}), ("dynmole", {"r": 16, "num_experts": 4})),
    ],
    ids=[
        "dynmole->mixlora-dynamic",
        "mixlora->mola",
        "switch->lora",
        "loramoe->dynmole",
        "mixlora->dynmole-full-size",
    ],
)
def test_reloading_a_slot_replaces_the_adapter_fully(
    tmp_path, arch, model, first: tuple[str | None, dict], second: tuple[str | None, dict]
):
    a = load_tiny(tmp_path, arch, first[0], "first", seed=3, **first[1])
    b = load_tiny(tmp_path, arch, second[0], "second", seed=4, **second[1])
    fresh = AdapterPool(arch, FULL, 2, torch.float32, "cpu")
    fresh.load(0, b)
    reused = AdapterPool(arch, FULL, 2, torch.float32, "cpu")
    reused.load(0, a)
    reused.load(0, b)
    _assert_same(_slot_state(fresh, 0), _slot_state(reused, 0))
    assert torch.equal(_logits(model, reused, {"second": 0}), _logits(model, fresh, {"second": 0}))


def test_routing_parameters_follow_the_loaded_adapter(tmp_path, arch):
    pool = AdapterPool(arch, FULL, 1, torch.float32, "cpu")
    pool.load(0, load_tiny(tmp_path, arch, "dynmole", "d", entropy_threshold=0.7, keep_top_k=3))
    r = pool.routing
    assert int(r.rule[0]) == int(RoutingRule.DYNMOLE)
    assert float(r.entropy_threshold[0]) == pytest.approx(0.7)
    assert int(r.keep_top_k[0]) == 3
    assert float(r.top_p[0]) == pytest.approx(0.75)
    pool.load(0, load_tiny(tmp_path, arch, "mixlora", "m", top_k=3))
    assert int(r.rule[0]) == int(RoutingRule.TOP_K)
    assert int(r.top_k[0]) == 3 and int(r.num_experts[0]) == 4
    for field in ("top_p", "entropy_threshold", "entropy_index", "entropy_eps", "keep_top_k"):
        assert float(getattr(r, field)[0]) == 0.0, field
    assert pool.names == ["m"]
    pool.load(0, load_tiny(tmp_path, arch, None, "l"))
    assert int(r.rule[0]) == 0 and not bool(pool.ffn_slots[0])
    assert pool.activations == [None]


def test_site_kinds_and_activation_per_slot(tmp_path, arch):
    pool = AdapterPool(arch, FULL, 3, torch.float32, "cpu")
    mix = load_tiny(tmp_path, arch, "mixlora", "mix", targets=("q_proj",) + MLP)
    gelu = load_tiny(tmp_path, arch, "mixlora", "gelu", act_fn="gelu", targets=MLP)
    mola = load_tiny(tmp_path, arch, "mola", "mola", targets=("k_proj", "down_proj"))
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
    small: AdapterWeights = load_tiny(tmp_path, arch, "loramoe", "s", r=8, num_experts=2)
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
    # The true rank per (slot, expert) group, for kernels that skip the zero padding.
    assert stack.group_ranks.tolist()[:2] == [8, 8] and not stack.group_ranks[2:].any()
