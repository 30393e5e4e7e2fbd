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
