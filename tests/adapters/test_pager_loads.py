"""AdapterPager registration and background loads on CPU with real tiny adapters: poll, load
failures, unload and adapter identity.

Background loads are made deterministic with a scripted loader (per-adapter gates and errors):
tests wait on events and futures (`pager.wait`), never on sleeps.
"""

from __future__ import annotations

import os

import pytest
import torch
from support.pager_helpers import (
    SHAPE,
    MakePager,
    ScriptedLoader,
    assert_pools_equal,
    pool_tensors,
    ready,
    settle,
    snapshot,
    write,
)

from mixserve.adapters import (
    AdapterCapacityError,
    AdapterError,
    AdapterFileError,
    AdapterNotFoundError,
    AdapterPool,
    AdapterState,
    load_adapter,
)

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
