"""A bad adapter never disturbs the adapters already loaded: failed validation and adapters too
big for the pool, or validated for another base model, leave every slot bit-identical."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from support.adapter_files import BaseDims, write_adapter
from support.bad_adapters import CONFIG, edit_weights, good_adapter
from support.harness import SeqSpec, make_runner, run_sequences
from support.tiny_models import tiny_config

from mixserve.adapters import (
    AdapterCapacityError,
    AdapterError,
    AdapterPool,
    PoolShape,
    load_adapter,
)
from mixserve.model import load_arch, load_model

# a bad adapter never disturbs the adapters already loaded

SEQS = [SeqSpec(list(range(3, 17)), "good"), SeqSpec(list(range(30, 39)))]


def _pool_state(pool: AdapterPool) -> dict[str, Any]:
    state: dict[str, Any] = {"names": list(pool.names), "acts": list(pool.activations)}
    for proj, stack in pool.stacks.sites.items():
        state[f"{proj}.a"] = stack.lora_a.clone()
        state[f"{proj}.b"] = stack.lora_b.clone()
        state[f"{proj}.scale"] = stack.scale.clone()
        state[f"{proj}.router"] = None if stack.router is None else stack.router.clone()
        state[f"{proj}.kind"] = pool.site_kinds[proj].clone()
    state["ffn_router"] = pool.stacks.ffn_router.clone()  # type: ignore[union-attr]
    state["ffn_slots"] = pool.ffn_slots.clone()
    for field in type(pool.routing).__dataclass_fields__:
        state[f"routing.{field}"] = getattr(pool.routing, field).clone()
    return state


def _assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


@pytest.fixture()
def loaded_pool(tmp_path, tiny_llama_dir, arch):
    """A 2-slot pool with a good DynMoLE adapter in slot 0, and its engine logits."""
    model = load_model(tiny_llama_dir)
    good = load_adapter("good", good_adapter(tmp_path, "dynmole", name="good", seed=11), arch)
    shape = PoolShape(8, 4, 4, attn_routers=True, mlp_routers=True, ffn_router=True)
    pool = AdapterPool(arch, shape, 2, torch.float32, "cpu")
    pool.load(0, good)
    logits = run_sequences(make_runner(model, pool), SEQS, {"good": 0}, chunk_sizes=[9, 5])
    base = run_sequences(make_runner(model), [SeqSpec(SEQS[0].token_ids)])[0]
    assert not torch.allclose(logits[0], base)  # the adapter does something
    return model, pool, logits


def test_failed_validation_leaves_loaded_adapters_bit_identical(tmp_path, arch, loaded_pool):
    model, pool, logits = loaded_pool
    before = _pool_state(pool)
    nan_dir = good_adapter(tmp_path, "dynmole", name="nan")
    edit_weights(
        nan_dir, lambda w: w["dynmole.layers.0.mlp.up_proj.moe_gate.weight"].fill_(torch.inf)
    )
    missing_dir = good_adapter(tmp_path, "mixlora", name="missing")
    edit_weights(missing_dir, lambda w: w.pop("mixlora.layers.1.mlp.moe_gate.weight"))
    json_dir = good_adapter(tmp_path, "mola", name="json")
    with open(os.path.join(json_dir, CONFIG), "w") as f:
        f.write("{")
    for bad in (nan_dir, missing_dir, json_dir, str(tmp_path / "absent")):
        with pytest.raises(AdapterError):
            load_adapter("good", bad, arch)  # even under the loaded adapter's own name
    _assert_same_state(before, _pool_state(pool))
    after = run_sequences(make_runner(model, pool), SEQS, {"good": 0}, chunk_sizes=[9, 5])
    for got, want in zip(after, logits, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("strategy", "kw", "match"),
    [
        ("dynmole", {"r": 16}, "rank 16 exceeds the pool's max rank 8"),
        ("mixlora", {"num_experts": 6}, "6 experts exceed the pool's 4"),
        ("mola", {"num_experts": 8, "targets": ("k_proj",)}, "8 experts exceed the pool's 4"),
    ],
)
def test_adapter_too_big_for_the_pool_leaves_every_slot_untouched(
    tmp_path, arch, loaded_pool, strategy: str, kw: dict[str, Any], match: str
):
    model, pool, logits = loaded_pool
    big = load_adapter("big", good_adapter(tmp_path, strategy, name="big", seed=5, **kw), arch)
    before = _pool_state(pool)
    for slot in (0, 1):
        with pytest.raises(AdapterCapacityError, match=match) as info:
            pool.load(slot, big)
        assert info.value.adapter == "big" and "adapter 'big'" in str(info.value)
    _assert_same_state(before, _pool_state(pool))
    after = run_sequences(make_runner(model, pool), SEQS, {"good": 0}, chunk_sizes=[9, 5])
    for got, want in zip(after, logits, strict=True):
        assert torch.equal(got, want)


def _save_config(path: Any, **overrides: object) -> str:
    os.makedirs(path, exist_ok=True)
    tiny_config("llama", **overrides).save_pretrained(str(path))
    return str(path)


def test_adapter_validated_for_another_base_model_is_refused_before_the_slot_is_touched(
    tmp_path, loaded_pool
):
    # An AdapterWeights validated against a 3-layer base fits the pool's rank and experts but not
    # its layers: the pool must refuse it with a typed error before clearing the slot.
    model, pool, logits = loaded_pool
    dims3 = BaseDims.of(tiny_config("llama", num_hidden_layers=3))
    arch3 = load_arch(_save_config(tmp_path / "base3", num_hidden_layers=3))
    other = load_adapter("other", write_adapter(str(tmp_path / "other"), dims3, "dynmole"), arch3)
    before = _pool_state(pool)
    with pytest.raises(AdapterError):
        pool.load(0, other)
    _assert_same_state(before, _pool_state(pool))
    after = run_sequences(make_runner(model, pool), SEQS, {"good": 0}, chunk_sizes=[9, 5])
    assert torch.equal(after[0], logits[0])
