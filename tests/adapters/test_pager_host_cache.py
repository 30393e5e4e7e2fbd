"""AdapterPager's host cache tier, HostCache itself and slot sizing, with real tiny adapters."""

from __future__ import annotations

import logging

import pytest
import torch
from support.pager_helpers import (
    BIG,
    SHAPE,
    assert_pools_equal,
    pool_tensors,
    ready,
    settle,
    write,
)

from mixserve.adapters import (
    AdapterPager,
    AdapterPool,
    AdapterState,
    HostCache,
    PoolShape,
    bytes_per_slot,
    load_adapter,
    num_slots_for_budget,
    slot_budget_bytes,
)
from mixserve.model import ArchConfig

# Host cache tier inside the pager


def test_in_flight_adapters_stay_in_the_host_cache_over_budget(make_pager, arch, tmp_path, caplog):
    one = load_adapter("x", write(tmp_path, "x"), arch).nbytes
    pager = make_pager(slots=1, host_budget=one)
    with caplog.at_level(logging.WARNING, logger="mixserve.adapters.host_cache"):
        ready(pager, tmp_path, "a", "b", release=False)  # both wanted, neither in a slot
    assert pager.stats().host_resident == 2 and "over its" in caplog.text
    pager.release("a")  # a lost its protection: trimmed at once
    assert pager.state("a") is AdapterState.NOT_LOADED and pager.stats().host_evictions == 1


def test_an_in_use_adapter_that_leaves_memory_is_reloaded(arch: ArchConfig, tmp_path):
    # A bf16 pool keeps host copies (a slot holds rounded weights), as a CUDA pool does; the
    # host cache keeps only protected entries.
    pool = AdapterPool(arch, SHAPE, 1, torch.bfloat16, "cpu")
    with AdapterPager(pool, host_budget_bytes=1) as pager:
        ready(pager, tmp_path, "a", release=False)
        uid = pager.uid("a")
        pager.prepare(["a"])  # a moves into the slot and loses its host protection...
        pager.unpin_all()
        assert pager.state("a") is AdapterState.SLOT and pager.stats().host_resident == 0
        ready(pager, tmp_path, "b", release=False)
        pager.prepare(["b"])  # ...so evicting its slot leaves nothing: it is read again
        assert pager.state("a") is AdapterState.LOADING
        assert [r.uid for r in settle(pager)] == [uid] and pager.is_ready("a")


def test_host_cache_lru_budget_and_protection(arch, tmp_path, caplog):
    weights = {n: load_adapter(n, write(tmp_path, n, seed=i), arch) for i, n in enumerate("abcd")}
    size = weights["a"].nbytes
    cache = HostCache(int(2.5 * size), pin_memory=False)
    assert cache.put("a", weights["a"]) == [] and cache.put("b", weights["b"]) == []
    assert cache.get("a") is weights["a"]  # a is now the most recent
    assert cache.put("c", weights["c"]) == ["b"]
    assert cache.names() == ["a", "c"] and cache.nbytes == 2 * size
    assert cache.put("d", weights["d"], protected={"a"}) == ["c"]
    with caplog.at_level(logging.WARNING):
        assert cache.put("b", weights["b"], protected={"a", "d", "b"}) == []
        assert cache.evict_until_fits({"a", "d", "b"}) == []  # still over: warned once only
    assert caplog.text.count("over its") == 1 and cache.nbytes == 3 * size
    assert cache.evict_until_fits({"d", "b"}) == ["a"]
    assert cache.pop("d") is weights["d"] and cache.get("d") is None
    stats = cache.stats()
    assert (stats.entries, stats.hits, stats.misses, stats.evictions) == (1, 1, 1, 3)
    assert (stats.insertions, stats.over_budget) == (5, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_host_cache_pins_on_cuda(arch, tmp_path):
    cache = HostCache(BIG, pin_memory=True)
    cache.put("a", load_adapter("a", write(tmp_path, "a"), arch))
    weights = cache.get("a")
    assert weights is not None and all(s.lora_a.is_pinned() for s in weights.sites.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_side_stream_copies_equal_direct_loads_on_cuda(arch: ArchConfig, tmp_path):
    paths = {"mix": write(tmp_path, "mix", "mixlora", seed=1), "lora": write(tmp_path, "lora")}
    pool = AdapterPool(arch, SHAPE, 2, torch.bfloat16, "cuda")
    with AdapterPager(pool, host_budget_bytes=BIG) as pager:
        for name, path in paths.items():
            pager.add_source(name, path)
            pager.acquire(name)
        settle(pager)
        placed = pager.prefetch_slots(["mix"]) | pager.prepare(["mix", "lora"])
        torch.cuda.current_stream().synchronize()
        direct = AdapterPool(arch, SHAPE, 2, torch.bfloat16, "cuda")
        for name, slot in placed.items():
            direct.load(slot, load_adapter(name, paths[name], arch))
        assert_pools_equal(pool_tensors(pool), pool_tensors(direct))
        pager.unpin_all()


# Sizing


def _pool_bytes(pool: AdapterPool) -> int:
    return sum(t.nbytes for t in pool_tensors(pool).values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_per_slot_matches_the_pool(arch: ArchConfig, dtype: torch.dtype):
    for shape in (SHAPE, PoolShape(8, 1, 1, False, False, False)):
        pool = AdapterPool(arch, shape, 3, dtype, "cpu")
        assert _pool_bytes(pool) == 3 * bytes_per_slot(shape, arch, dtype)


def test_slots_for_a_budget(arch: ArchConfig):
    per = bytes_per_slot(SHAPE, arch, torch.float32)
    assert num_slots_for_budget(SHAPE, arch, torch.float32, 3 * per + per // 2) == 3
    assert num_slots_for_budget(SHAPE, arch, torch.float32, 10 * per, max_slots=4) == 4
    with pytest.raises(ValueError, match="holds no slot"):
        num_slots_for_budget(SHAPE, arch, torch.float32, per - 1)
    assert slot_budget_bytes("cpu", budget_bytes=123) == 123
    for kwargs in ({}, {"budget_bytes": 1, "fraction_of_free": 0.5}):
        with pytest.raises(ValueError, match="exactly one"):
            slot_budget_bytes("cpu", **kwargs)
    with pytest.raises(ValueError, match="CUDA"):
        slot_budget_bytes("cpu", fraction_of_free=0.5)
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        assert 0 < slot_budget_bytes("cuda", fraction_of_free=0.5) <= free


def test_the_pool_must_start_empty(arch: ArchConfig, tmp_path):
    pool = AdapterPool(arch, SHAPE, 1, torch.float32, "cpu")
    pool.load(0, load_adapter("a", write(tmp_path, "a"), arch))
    with pytest.raises(ValueError, match="start empty"):
        AdapterPager(pool, host_budget_bytes=BIG)
