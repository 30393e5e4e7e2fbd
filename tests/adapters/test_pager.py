"""AdapterPager, HostCache and slot sizing on CPU with real tiny adapters.

Background loads are made deterministic with a scripted loader (per-adapter gates and errors):
tests wait on events and futures (`pager.wait`), never on sleeps.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import torch
from support.adapter_files import BaseDims, write_adapter
from support.tiny_models import tiny_config

from mixserve.adapters import (
    AdapterCapacityError,
    AdapterError,
    AdapterFileError,
    AdapterLoadResult,
    AdapterNotFoundError,
    AdapterPager,
    AdapterPool,
    AdapterState,
    AdapterWeights,
    HostCache,
    PoolShape,
    bytes_per_slot,
    load_adapter,
    num_slots_for_budget,
    slot_budget_bytes,
)
from mixserve.kernels import RoutingParams
from mixserve.model import ArchConfig, load_arch

DIMS = BaseDims.of(tiny_config("llama"))
SHAPE = PoolShape(16, 4, 4, attn_routers=True, mlp_routers=True, ffn_router=True)
BIG = 10**12  # a host budget nothing reaches


@pytest.fixture(scope="module")
def arch(tiny_llama_dir: str) -> ArchConfig:
    return load_arch(tiny_llama_dir)


class ScriptedLoader:
    """load_adapter behind optional per-name gates and errors; counts calls (worker threads)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.gates: dict[str, threading.Event] = {}
        self.errors: dict[str, BaseException] = {}
        self._lock = threading.Lock()

    def hold(self, name: str) -> threading.Event:
        gate = self.gates[name] = threading.Event()
        return gate

    def __call__(self, name: str, path: str, arch: ArchConfig) -> AdapterWeights:
        with self._lock:
            self.calls[name] += 1
        gate = self.gates.get(name)
        if gate is not None and not gate.wait(60):
            raise TimeoutError("the test never opened this gate")
        error = self.errors.get(name)
        if error is not None:
            raise error
        return load_adapter(name, path, arch)


MakePager = Callable[..., AdapterPager]


@pytest.fixture
def make_pager(arch: ArchConfig) -> Iterator[MakePager]:
    made: list[AdapterPager] = []

    def make(*, slots: int = 2, host_budget: int = BIG, loader=load_adapter) -> AdapterPager:
        pool = AdapterPool(arch, SHAPE, slots, torch.float32, "cpu")
        pager = AdapterPager(pool, host_budget_bytes=host_budget, loader=loader)
        made.append(pager)
        return pager

    yield make
    for pager in made:
        pager.close()


def write(tmp_path, name: str, strategy: str | None = None, seed: int = 0, **kw) -> str:
    return write_adapter(str(tmp_path / name), DIMS, strategy, seed=seed, **kw)


def settle(pager: AdapterPager) -> list[AdapterLoadResult]:
    """Poll until no adapter is loading; waits on the load futures, not on a clock."""
    results = pager.poll()
    while pager.stats().loading:
        assert pager.wait(60), "a background load did not finish"
        results += pager.poll()
    return results


def ready(pager: AdapterPager, tmp_path, *names: str, release: bool = True) -> None:
    """Register, acquire and load each (distinct seeds); release again unless told not to."""
    for i, name in enumerate(names):
        pager.add_source(name, write(tmp_path, name, seed=i))
        pager.acquire(name)
    assert all(r.ok for r in settle(pager))
    for name in names:
        assert pager.is_ready(name)
        if release:
            pager.release(name)


def pool_tensors(pool: AdapterPool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {"ffn_slots": pool.ffn_slots}
    for proj, stack in pool.stacks.sites.items():
        out.update({f"{proj}.a": stack.lora_a, f"{proj}.b": stack.lora_b})
        out[f"{proj}.scale"] = stack.scale
        if stack.router is not None:
            out[f"{proj}.router"] = stack.router
        out[f"{proj}.kind"] = pool.site_kinds[proj]
    if pool.stacks.ffn_router is not None:
        out["ffn_router"] = pool.stacks.ffn_router
    for field in RoutingParams.__dataclass_fields__:
        out[f"routing.{field}"] = getattr(pool.routing, field)
    return out


def snapshot(pool: AdapterPool) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pool_tensors(pool).items()}


def assert_pools_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


# Background loads and poll


def test_acquire_loads_in_the_background_and_poll_delivers(make_pager: MakePager, tmp_path):
    loader = ScriptedLoader()
    gate = loader.hold("a")
    pager = make_pager(loader=loader)
    pager.add_source("a", write(tmp_path, "a"))
    uid = pager.acquire("a")
    assert pager.state("a") is AdapterState.LOADING and not pager.is_ready("a")
    assert pager.poll() == []  # the worker is still held at the gate
    gate.set()
    [result] = settle(pager)
    assert result.ok and result.name == "a" and result.uid == uid and result.seconds > 0
    assert pager.state("a") is AdapterState.HOST and pager.is_ready("a")
    stats = pager.stats()
    assert (stats.loads, stats.disk_loads, stats.load_failures, stats.host_resident) == (1, 1, 0, 1)


def test_many_acquires_trigger_exactly_one_load(make_pager: MakePager, tmp_path):
    loader = ScriptedLoader()
    gate = loader.hold("a")
    pager = make_pager(loader=loader)
    pager.add_source("a", write(tmp_path, "a"))
    uids = {pager.acquire("a") for _ in range(8)}
    gate.set()
    assert len(settle(pager)) == 1
    assert len(uids) == 1 and pager.in_flight("a") == 8
    for _ in range(8):
        pager.release("a")
    pager.acquire("a")  # resident: no second load
    assert pager.poll() == [] and loader.calls["a"] == 1 and pager.stats().disk_loads == 1


def test_a_failing_adapter_never_disturbs_the_others(make_pager: MakePager, tmp_path):
    loader = ScriptedLoader()
    pager = make_pager(loader=loader)
    ready(pager, tmp_path, "good", release=False)
    slots = pager.prepare(["good"])
    pager.unpin_all()
    before = snapshot(pager.pool)
    loader.errors["bad"] = AdapterFileError("bad", "truncated or corrupt file", file="x.bin")
    loader.errors["buggy"] = RuntimeError("boom")
    for name in ("bad", "buggy"):
        pager.add_source(name, write(tmp_path, name))
        pager.acquire(name)
    results = {r.name: r for r in settle(pager)}
    assert isinstance(results["bad"].error, AdapterFileError)
    wrapped = results["buggy"].error
    assert isinstance(wrapped, AdapterError) and isinstance(wrapped.__cause__, RuntimeError)
    assert "adapter 'buggy'" in str(wrapped) and "boom" in str(wrapped)
    assert pager.state("bad") is AdapterState.NOT_LOADED
    assert pager.slot_of("good") == slots["good"] and pager.state("good") is AdapterState.SLOT
    assert_pools_equal(pool_tensors(pager.pool), before)
    assert pager.stats().load_failures == 2
    del loader.errors["bad"]  # fixed on disk: the next request retries and succeeds
    pager.acquire("bad")
    assert [r.ok for r in settle(pager)] == [True] and pager.is_ready("bad")


def test_an_adapter_larger_than_the_pool_fails_at_load_time(make_pager: MakePager, tmp_path):
    pager = make_pager()
    pager.add_source("huge", write(tmp_path, "huge", r=32))
    pager.acquire("huge")
    [result] = settle(pager)
    assert isinstance(result.error, AdapterCapacityError) and not pager.is_ready("huge")


def test_acquire_refuses_unknown_names_and_missing_files(make_pager: MakePager, tmp_path):
    pager = make_pager()
    with pytest.raises(AdapterNotFoundError, match="no adapter of this name"):
        pager.acquire("nope")
    pager.add_source("gone", str(tmp_path / "gone"))
    with pytest.raises(AdapterNotFoundError):
        pager.acquire("gone")
    assert pager.in_flight("gone") == 0 and pager.stats().disk_loads == 0
    with pytest.raises(ValueError, match="without a matching acquire"):
        pager.release("gone")


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


# Host cache tier inside the pager


def test_in_flight_adapters_stay_in_the_host_cache_over_budget(make_pager, arch, tmp_path, caplog):
    one = load_adapter("x", write(tmp_path, "x"), arch).nbytes
    pager = make_pager(slots=1, host_budget=one)
    with caplog.at_level(logging.WARNING, logger="mixserve.adapters.host_cache"):
        ready(pager, tmp_path, "a", "b", release=False)  # both wanted, neither in a slot
    assert pager.stats().host_resident == 2 and "over its" in caplog.text
    pager.release("a")  # a lost its protection: trimmed at once
    assert pager.state("a") is AdapterState.NOT_LOADED and pager.stats().host_evictions == 1


def test_an_in_use_adapter_that_leaves_memory_is_reloaded(make_pager: MakePager, tmp_path):
    pager = make_pager(slots=1, host_budget=1)  # the host cache keeps only protected entries
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


# Unload


def test_unload_waits_for_in_flight_requests(make_pager: MakePager, tmp_path):
    pager = make_pager(slots=2)
    ready(pager, tmp_path, "a", "b", release=False)
    pager.acquire("a")
    slot = pager.prepare(["a"])["a"]
    pager.unpin_all()
    assert pager.request_unload("a") is False
    with pytest.raises(AdapterNotFoundError, match="being unloaded"):
        pager.acquire("a")
    assert not pager.has_source("a") and "a" not in pager.sources()
    assert pager.prepare(["a"]) == {"a": slot}  # running requests still run
    pager.unpin_all()
    assert pager.release("a") is False and pager.release("a") is True
    assert pager.pool.names[slot] is None and pager.stats().host_resident == 1
    assert all(not t.any() for k, t in pool_tensors(pager.pool).items() if k.endswith(".a"))
    with pytest.raises(AdapterNotFoundError, match="no adapter of this name"):
        pager.acquire("a")
    pager.release("b")
    assert pager.request_unload("b") is True and pager.stats().registered == 0


def test_unload_during_a_load_discards_its_result(make_pager: MakePager, tmp_path):
    loader = ScriptedLoader()
    gate = loader.hold("a")
    pager = make_pager(loader=loader)
    pager.add_source("a", write(tmp_path, "a"))
    pager.acquire("a")
    pager.release("a")
    assert pager.request_unload("a") is True
    gate.set()
    pager.wait(60)
    assert pager.poll() == [] and pager.stats().host_resident == 0


# Identity


def bump_mtime(path: str) -> None:
    """Rewrites within one mtime tick with equal sizes are invisible to stat: make time pass."""
    for file in os.listdir(path):
        st = os.stat(os.path.join(path, file))
        os.utime(os.path.join(path, file), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_uid_is_stable_across_eviction_and_reload(make_pager: MakePager, tmp_path):
    pager = make_pager(slots=1, host_budget=1)  # the host cache keeps nothing idle
    ready(pager, tmp_path, "a", "b")
    uid = pager.uid("a")
    assert pager.state("a") is AdapterState.NOT_LOADED
    assert pager.acquire("a") == uid  # read from disk again: the same identity
    settle(pager)
    assert pager.stats().disk_loads == 3 and pager.uid("a") == uid != pager.uid("b")


def test_rewritten_files_get_a_new_uid_once_idle(make_pager, arch, tmp_path):
    pager = make_pager(slots=1)
    ready(pager, tmp_path, "a", release=False)
    uid = pager.uid("a")
    path = write(tmp_path, "a", seed=5)
    bump_mtime(path)
    assert pager.acquire("a") == uid  # a request uses the old copy: new ones share it
    pager.release("a")
    pager.release("a")
    assert pager.state("a") is AdapterState.HOST
    new = pager.uid("a")
    assert new != uid and pager.acquire("a") == new  # idle: the stale copy is dropped
    assert pager.state("a") is AdapterState.LOADING
    settle(pager)
    pager.prepare(["a"])
    direct = AdapterPool(arch, SHAPE, 1, torch.float32, "cpu")
    direct.load(0, load_adapter("a", path, arch))
    assert_pools_equal(pool_tensors(pager.pool), pool_tensors(direct))
    pager.unpin_all()
    pager.release("a")
    pager.add_source("a", write(tmp_path, "elsewhere", seed=5))  # same bytes, other folder
    assert pager.uid("a") not in (uid, new) and not pager.is_ready("a")
    assert pager.stats().slots_in_use == 0


def test_files_changed_during_a_load_fail_it(make_pager: MakePager, tmp_path):
    loader = ScriptedLoader()
    gate = loader.hold("a")
    pager = make_pager(loader=loader)
    path = write(tmp_path, "a")
    pager.add_source("a", path)
    pager.acquire("a")
    bump_mtime(write(tmp_path, "a", seed=3))
    gate.set()
    [result] = settle(pager)
    assert isinstance(result.error, AdapterFileError) and "changed while loading" in str(
        result.error
    )


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
