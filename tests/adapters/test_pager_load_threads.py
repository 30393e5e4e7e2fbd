"""Adapter loads run torch single-threaded on their worker threads (mixserve.torch_threads)."""

from __future__ import annotations

import torch
from support.pager_helpers import MakePager, ScriptedLoader, settle, write


class ThreadCountLoader(ScriptedLoader):
    """Records torch's intra-op thread count on the worker that runs each load."""

    def __init__(self) -> None:
        super().__init__()
        self.thread_counts: list[int] = []

    def __call__(self, name, path, arch):
        self.thread_counts.append(torch.get_num_threads())
        return super().__call__(name, path, arch)


def test_load_workers_never_start_an_openmp_team(make_pager: MakePager, tmp_path):
    caller_threads = torch.get_num_threads()
    loader = ThreadCountLoader()
    pager = make_pager(loader=loader)
    for name in ("a", "b"):
        pager.add_source(name, write(tmp_path, name, "mixlora"))
        pager.acquire(name)
    results = settle(pager)
    assert [r.ok for r in results] == [True, True]
    assert loader.thread_counts == [1, 1]
    # The caller (the engine thread) keeps its own count.
    assert torch.get_num_threads() == caller_threads


def test_running_loads_are_counted_without_the_queued_ones(make_pager: MakePager, tmp_path):
    import time

    loader = ScriptedLoader()
    gates = [loader.hold(name) for name in ("a", "b", "c")]
    pager = make_pager(loader=loader)  # two worker threads: c waits in the queue
    for name in ("a", "b", "c"):
        pager.add_source(name, write(tmp_path, name, "mixlora"))
        pager.acquire(name)
    deadline = time.monotonic() + 60
    while sum(loader.calls.values()) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pager.num_loads_running == 2
    for gate in gates:
        gate.set()
    assert [r.ok for r in settle(pager)] == [True, True, True]
    assert pager.num_loads_running == 0
