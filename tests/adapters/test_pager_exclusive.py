"""AdapterPager's exclusive tiers on CPU: an adapter in a slot keeps no host copy, is read back
into the host cache when its slot is overwritten (no disk read), and comes back identical;
a pool that stores adapters inexactly (bf16) keeps host copies. Loads placed in free slots."""

from __future__ import annotations

import pytest
import torch
from support.pager_helpers import (
    SHAPE,
    MakePager,
    assert_pools_equal,
    ready,
    snapshot,
    write,
)

from mixserve.adapters import AdapterPager, AdapterPool, AdapterState, load_adapter
from mixserve.adapters.errors import AdapterCapacityError
from mixserve.adapters.slots import SlotTable
from mixserve.model import ArchConfig


def test_a_slotted_adapter_leaves_the_host_cache_and_comes_back_on_eviction(
    make_pager: MakePager, tmp_path
):
    pager = make_pager(slots=1)
    ready(pager, tmp_path, "a", "b")
    assert pager.stats().host_resident == 2
    slot = pager.prepare(["a"])["a"]
    pager.unpin_all()
    first = snapshot(pager.pool)
    stats = pager.stats()
    assert pager.state("a") is AdapterState.SLOT and stats.host_resident == 1  # only b
    assert stats.host_bytes == pager.tiers.host.peek("b").nbytes
    pager.prepare(["b"])  # overwrites a's slot: a is read back, not re-read from disk
    pager.unpin_all()
    assert pager.state("a") is AdapterState.HOST and pager.state("b") is AdapterState.SLOT
    assert pager.stats().host_resident == 1 and pager.stats().disk_loads == 2
    assert pager.prepare(["a"]) == {"a": slot}
    pager.unpin_all()
    assert_pools_equal(snapshot(pager.pool), first)
    assert pager.stats().disk_loads == 2 and pager.stats().host_hits == 3


def test_read_back_over_budget_keeps_an_adapter_requests_use(make_pager: MakePager, tmp_path):
    """Read back into a full host cache, an adapter still wanted stays there (over budget)
    rather than being read from disk again."""
    pager = make_pager(slots=1, host_budget=1)
    ready(pager, tmp_path, "a", release=False)
    pager.prepare(["a"])
    pager.unpin_all()
    ready(pager, tmp_path, "b", release=False)
    pager.prepare(["b"])
    pager.unpin_all()
    assert pager.state("a") is AdapterState.HOST and pager.stats().disk_loads == 2
    pager.release("b")
    pager.prepare(["a"])  # b is idle: read back, then trimmed from the over-full cache
    assert pager.state("b") is AdapterState.NOT_LOADED and pager.stats().disk_loads == 2


def test_the_read_back_never_evicts_the_adapter_coming_in(make_pager: MakePager, tmp_path):
    """An idle prefetch into an idle adapter's slot: the read-back's put must evict the leaving
    adapter, not the incoming one's host copy (which would leave it in the slot without a uid)."""
    pager = make_pager(slots=1)
    ready(pager, tmp_path, "a")
    pager.prepare(["a"])
    pager.unpin_all()
    ready(pager, tmp_path, "x")  # the host cache holds x alone: a's copy is its slot
    pager.tiers.host.budget_bytes = pager.tiers.host.peek("x").nbytes  # room for one adapter
    assert pager.prefetch_slots(["x"]) == {"x": 0}
    assert pager.state("x") is AdapterState.SLOT and pager._entries["x"].uid is not None
    assert pager.state("a") is AdapterState.NOT_LOADED and pager._entries["a"].uid is None


def test_unloading_a_slot_only_adapter_forgets_it(make_pager: MakePager, tmp_path):
    pager = make_pager(slots=2)
    ready(pager, tmp_path, "a")
    pager.prepare(["a"])
    pager.unpin_all()
    assert pager.request_unload("a")
    assert pager.tiers._slot_only == {} and pager.stats().slots_in_use == 0


def test_a_bf16_pool_keeps_host_copies(arch: ArchConfig, tmp_path):
    pool = AdapterPool(arch, SHAPE, 1, torch.bfloat16, "cpu")
    with AdapterPager(pool, host_budget_bytes=10**12) as pager:
        ready(pager, tmp_path, "a", "b")
        pager.prepare(["a"])
        pager.unpin_all()
        assert pager.stats().host_resident == 2  # a's slot holds rounded weights
        pager.prepare(["b"])
        pager.unpin_all()
        assert pager.state("a") is AdapterState.HOST


def test_read_backs_go_through_the_pagers_host_copies(arch: ArchConfig, tmp_path):
    """The host copies of a read-back come from host_copies (the engine passes its load
    worker's spare exchange files), and the adapter comes back bit for bit."""
    copied: list[int] = []

    def host_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        copied.append(len(tensors))
        return [t.clone(memory_format=torch.contiguous_format) for t in tensors]

    pool = AdapterPool(arch, SHAPE, 1, torch.float32, "cpu")
    with AdapterPager(pool, host_budget_bytes=10**12, host_copies=host_copies) as pager:
        ready(pager, tmp_path, "a", "b")
        pager.prepare(["a"])
        pager.unpin_all()
        first = snapshot(pager.pool)
        assert copied == []
        pager.prepare(["b"])  # a's slot is overwritten: a is read back through host_copies
        pager.unpin_all()
        assert len(copied) == 1 and copied[0] == len(pager.tiers.host.peek("a").tensors())
        pager.prepare(["a"])
        pager.unpin_all()
        assert_pools_equal(snapshot(pager.pool), first)


def test_prefetch_into_free_slots_only(make_pager: MakePager, tmp_path):
    pager = make_pager(slots=1)
    ready(pager, tmp_path, "idle", "new")
    assert pager.prefetch_slots(["idle"], free_only=True) == {"idle": 0}
    assert pager.prefetch_slots(["new"], free_only=True) == {}  # idle would have to go
    assert pager.prefetch_slots(["new"]) == {"new": 0}
    assert pager.state("idle") is AdapterState.HOST and pager.stats().host_resident == 1


def test_a_refused_write_reads_nothing_back(arch: ArchConfig, tmp_path):
    """The eviction hook runs only once the pool would take the incoming adapter: a refused
    write leaves the slot's adapter (and its skeleton) where they were."""
    table = SlotTable(AdapterPool(arch, SHAPE, 1, torch.float32, "cpu"))
    calls: list[tuple[int, str, str]] = []
    table.before_evict = lambda *args: calls.append(args)
    table.write(0, load_adapter("a", write(tmp_path, "a"), arch))
    too_big = load_adapter("big", write(tmp_path, "big", r=SHAPE.max_rank * 2), arch)
    with pytest.raises(AdapterCapacityError):
        table.write(0, too_big)
    assert calls == [] and table.names == ["a"]
    table.write(0, load_adapter("b", write(tmp_path, "b", seed=1), arch))
    assert calls == [(0, "a", "b")]
