"""AdapterPager slots on CPU with real tiny adapters: prepare, LRU eviction, pins, prefetch."""

from __future__ import annotations

import pytest
import torch
from support.pager_helpers import (
    SHAPE,
    MakePager,
    assert_pools_equal,
    pool_tensors,
    ready,
    settle,
    write,
)

from mixserve.adapters import AdapterPool, AdapterState, load_adapter

# Slots


def test_prepare_equals_loading_straight_into_a_pool(make_pager: MakePager, arch, tmp_path):
    pager = make_pager(slots=3)
    paths = {"mix": write(tmp_path, "mix", "mixlora", seed=1), "lora": write(tmp_path, "lora")}
    paths["dyn"] = write(tmp_path, "dyn", "dynmole", seed=2)
    for name, path in paths.items():
        pager.add_source(name, path)
        pager.acquire(name)
    settle(pager)
    slots = pager.prepare(["mix", "lora"])
    pager.unpin_all()
    slots |= pager.prepare(["dyn"])
    direct = AdapterPool(arch, SHAPE, 3, torch.float32, "cpu")
    for name, slot in slots.items():
        direct.load(slot, load_adapter(name, paths[name], arch))
    assert_pools_equal(pool_tensors(pager.pool), pool_tensors(direct))
    assert pager.pool.names == direct.names and pager.pool.activations == direct.activations


def test_a_reused_slot_equals_a_fresh_one(make_pager: MakePager, arch, tmp_path):
    pager = make_pager(slots=1)
    pager.add_source("mix", write(tmp_path, "mix", "mixlora", seed=1))
    pager.add_source("lora", write(tmp_path, "lora"))
    for name in ("mix", "lora"):
        pager.acquire(name)
        settle(pager)
        pager.release(name)
    pager.prepare(["mix"])
    pager.unpin_all()
    assert pager.prepare(["lora"]) == {"lora": 0}  # evicts the MixLoRA adapter
    direct = AdapterPool(arch, SHAPE, 1, torch.float32, "cpu")
    direct.load(0, load_adapter("lora", str(tmp_path / "lora"), arch))
    assert_pools_equal(pool_tensors(pager.pool), pool_tensors(direct))


def test_slot_eviction_is_lru_and_honors_pins(make_pager: MakePager, tmp_path):
    pager = make_pager(slots=2)
    ready(pager, tmp_path, "a", "b", "c")
    sa = pager.prepare(["a"])["a"]
    pager.unpin_all()
    sb = pager.prepare(["b"])["b"]
    pager.unpin_all()
    assert pager.prepare(["a"]) == {"a": sa}  # hit; a is now the most recently used
    pager.unpin_all()
    assert pager.prepare(["c"]) == {"c": sb}  # b was the least recently used
    assert pager.prepare(["b"]) == {"b": sa}  # c stays pinned: the only unpinned slot is a's
    with pytest.raises(ValueError, match="do not fit"):
        pager.prepare(["a"])  # every slot is pinned by this step
    pager.unpin_all()
    stats = pager.stats()
    assert (stats.slot_hits, stats.host_hits, stats.slot_evictions) == (1, 4, 2)
    assert pager.state("a") is AdapterState.HOST and pager.stats().slots_pinned == 0


def test_eviction_prefers_slots_no_request_uses(make_pager: MakePager, tmp_path):
    pager = make_pager(slots=2)
    ready(pager, tmp_path, "busy", "idle", "new")
    pager.acquire("busy")
    slots = pager.prepare(["busy"])
    pager.unpin_all()
    pager.prepare(["idle"])
    pager.unpin_all()
    # busy is the least recently used, but a request still uses it
    assert pager.prepare(["new"]) == {"new": 1 - slots["busy"]}
    assert pager.slot_of("busy") == slots["busy"] and pager.slot_of("idle") is None


def test_prepare_refuses_what_cannot_run(make_pager: MakePager, tmp_path):
    pager = make_pager(slots=2)
    ready(pager, tmp_path, "a", "b", "c")
    with pytest.raises(ValueError, match="do not fit"):
        pager.prepare(["a", "b", "c"])
    pager.add_source("cold", write(tmp_path, "cold"))
    with pytest.raises(ValueError, match="cold"):
        pager.prepare(["a", "cold"])
    assert pager.stats().slots_in_use == 0  # nothing was placed


def test_prefetch_fills_free_and_idle_slots_only(make_pager: MakePager, tmp_path):
    pager = make_pager(slots=2)
    ready(pager, tmp_path, "a", "b", "c", release=False)
    pinned = pager.prepare(["a"])
    assert pager.prefetch_slots(["b"]) == {"b": 1 - pinned["a"]}
    assert pager.prefetch_slots(["c"]) == {}  # a is pinned, b has a request in flight
    pager.unpin_all()
    pager.release("a")
    assert pager.prefetch_slots(["c", "b"]) == {"c": pinned["a"]}  # b is there already
    assert pager.prepare(["b", "c"]) == {"b": 1 - pinned["a"], "c": pinned["a"]}
    stats = pager.stats()
    assert (stats.prefetches, stats.slot_hits, stats.slots_in_use) == (2, 2, 2)
