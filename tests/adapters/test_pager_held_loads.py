"""Held loads (`acquire(hold=True)`): ticketed at once, run only once `start_loads` names them."""

from __future__ import annotations

import time

from support.pager_helpers import MakePager, ScriptedLoader, settle, write

from mixserve.adapters import AdapterState


def _wait_for_calls(loader: ScriptedLoader, count: int) -> None:
    deadline = time.monotonic() + 60
    while sum(loader.calls.values()) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_held_load_waits_for_its_name(make_pager: MakePager, tmp_path):
    loader = ScriptedLoader()
    pager = make_pager(loader=loader)
    for name in ("a", "b"):
        pager.add_source(name, write(tmp_path, name, "mixlora"))
        pager.acquire(name, hold=True)
    assert pager.state("a") is AdapterState.LOADING
    assert (pager.num_loads_held, pager.num_loads_started) == (2, 0)
    assert not pager.wait(0)  # nothing started: nothing to wait for
    assert pager.start_loads(["b", "unknown"]) == 1
    assert (pager.num_loads_held, pager.num_loads_started) == (1, 1)
    assert pager.wait(60)
    assert [r.name for r in pager.poll()] == ["b"]
    assert pager.is_ready("b") and not pager.is_ready("a")
    assert loader.calls == {"b": 1}
    assert pager.start_loads(["b"]) == 0  # ready: nothing held to start
    assert pager.start_loads() == 1
    assert [r.name for r in settle(pager)] == ["a"]
    assert loader.calls == {"a": 1, "b": 1}


def test_start_all_keeps_the_order_of_acquires(make_pager: MakePager, tmp_path):
    order: list[str] = []

    class OrderLoader(ScriptedLoader):
        def __call__(self, name, path, arch):
            order.append(name)
            return super().__call__(name, path, arch)

    loader = OrderLoader()
    gates = {name: loader.hold(name) for name in ("first", "second")}
    pager = make_pager(loader=loader)  # two worker threads, both held up below
    names = ("first", "second", "c", "a", "b")
    for name in names:
        pager.add_source(name, write(tmp_path, name, "mixlora"))
    pager.acquire("first")
    pager.acquire("second")
    _wait_for_calls(loader, 2)
    for name in names[2:]:
        pager.acquire(name, hold=True)
    assert pager.start_loads() == 3
    gates["first"].set()  # one free worker takes the queue in order
    _wait_for_calls(loader, 5)
    gates["second"].set()
    assert sorted(r.name for r in settle(pager)) == sorted(names)
    assert order[2:] == ["c", "a", "b"]


def test_acquire_without_hold_starts_a_held_load(make_pager: MakePager, tmp_path):
    loader = ScriptedLoader()
    pager = make_pager(loader=loader)
    pager.add_source("a", write(tmp_path, "a", "mixlora"))
    pager.acquire("a", hold=True)
    pager.acquire("a")  # a second user that wants it now (the API's prefetch)
    assert pager.num_loads_held == 0
    assert pager.wait(60)
    assert [r.ok for r in pager.poll()] == [True]
    assert pager.in_flight("a") == 2


def test_an_unloaded_adapter_drops_its_held_load(make_pager: MakePager, tmp_path):
    loader = ScriptedLoader()
    pager = make_pager(loader=loader)
    pager.add_source("a", write(tmp_path, "a", "mixlora"))
    pager.acquire("a", hold=True)
    pager.release("a")
    assert pager.request_unload("a")
    assert pager.num_loads_held == 0
    assert pager.start_loads() == 0
    assert loader.calls == {}
    assert not pager.has_source("a")


def test_a_held_load_nobody_uses_any_more_is_dropped(make_pager: MakePager, tmp_path):
    loader = ScriptedLoader()
    pager = make_pager(loader=loader)
    pager.add_source("a", write(tmp_path, "a", "mixlora"))
    pager.acquire("a", hold=True)
    pager.acquire("a", hold=True)
    pager.release("a")
    assert pager.num_loads_held == 1  # one request still waits for it
    pager.release("a")
    assert pager.num_loads_held == 0
    assert pager.state("a") is AdapterState.NOT_LOADED
    assert pager.start_loads() == 0 and loader.calls == {}
    pager.acquire("a")  # a later request loads it afresh
    assert [r.ok for r in settle(pager)] == [True]
    assert loader.calls == {"a": 1}


def test_close_cancels_held_loads(make_pager: MakePager, tmp_path):
    loader = ScriptedLoader()
    pager = make_pager(loader=loader)
    pager.add_source("a", write(tmp_path, "a", "mixlora"))
    pager.acquire("a", hold=True)
    pager.close()
    assert loader.calls == {}
    assert pager.num_loads_held == 0
