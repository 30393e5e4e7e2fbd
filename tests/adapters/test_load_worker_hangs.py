"""Load workers that hang, die or are closed mid-load (mixserve.adapters.process_loader): a
read never blocks the engine past load_timeout_s, nor its shutdown at all."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import pytest
from support.bad_adapters import good_adapter
from support.load_workers import assert_same_weights, stopped_worker
from support.pager_helpers import MakePager, write

from mixserve.adapters import AdapterError, load_adapter
from mixserve.adapters.process_loader import ProcessLoader, _Worker


def test_a_worker_that_hangs_while_starting_is_killed_and_replaced(tmp_path, arch, caplog):
    loader = ProcessLoader(max_workers=1)
    try:
        worker = stopped_worker(loader, ready=False)
        loader.wait_until_ready(timeout_s=0.5)
        assert "hung while starting" in caplog.text
        assert loader._workers == []
        assert worker.proc.poll() == -signal.SIGKILL
        path = good_adapter(tmp_path)
        assert_same_weights(loader("a", path, arch), load_adapter("a", path, arch))
        assert loader._workers and loader._workers[0] is not worker
    finally:
        loader.close()


def test_a_load_past_the_timeout_fails_and_its_worker_is_replaced(tmp_path, arch):
    loader = ProcessLoader(max_workers=1, load_timeout_s=0.5)
    try:
        worker = stopped_worker(loader, ready=True)  # a read that never ends
        path = good_adapter(tmp_path)
        with pytest.raises(AdapterError, match="killed: no reply in 0.5 s"):
            loader("a", path, arch)
        assert worker.proc.poll() == -signal.SIGKILL
        assert loader._workers == []
        loader._load_timeout_s = 120  # the replacement's start takes seconds
        assert_same_weights(loader("a", path, arch), load_adapter("a", path, arch))
    finally:
        loader.close()


def test_a_timed_out_load_removes_the_file_its_worker_wrote(tmp_path, arch, monkeypatch):
    """The reply is late though the exchange file is written: the engine named that file, so
    it removes it."""
    loader = ProcessLoader(max_workers=1, load_timeout_s=30)
    folder = loader.exchange_dir
    assert folder is not None

    def file_written_but_no_reply(worker: _Worker, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not os.listdir(folder) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.listdir(folder), "the worker wrote no exchange file"
        return False

    try:
        loader.start()
        loader.wait_until_ready()  # the patch below is for the load's reply only
        monkeypatch.setattr(_Worker, "_replies_within", file_written_but_no_reply)
        with pytest.raises(AdapterError, match="killed: no reply in 30 s"):
            loader("a", good_adapter(tmp_path), arch)
        assert os.listdir(folder) == []
    finally:
        loader.close()


def test_a_worker_that_never_starts_fails_the_load_within_the_timeout(tmp_path, arch):
    loader = ProcessLoader(max_workers=1, load_timeout_s=0.5)
    try:
        worker = stopped_worker(loader, ready=False)
        with pytest.raises(AdapterError, match="killed: no reply in 0.5 s"):
            loader("a", good_adapter(tmp_path), arch)
        assert worker.proc.poll() == -signal.SIGKILL
        assert loader._workers == []
    finally:
        loader.close()


def test_a_load_waiting_for_a_busy_worker_gets_its_replacement(tmp_path, arch):
    """max_workers=1: the one worker hangs and is killed; the load that waited for it starts
    the next worker instead of waiting for an idle one that never comes."""
    loader = ProcessLoader(max_workers=1, load_timeout_s=15.0)  # > a worker's start
    path = good_adapter(tmp_path)
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        stopped_worker(loader, ready=True)
        hung = pool.submit(loader, "a", path, arch)
        time.sleep(0.2)  # the second load now waits in _take
        waiting = pool.submit(loader, "a", path, arch)
        with pytest.raises(AdapterError, match="killed"):
            hung.result(timeout=60)
        assert_same_weights(waiting.result(timeout=60), load_adapter("a", path, arch))
    finally:
        loader.close()  # a load still waiting in _take gives up within 0.5 s
        pool.shutdown()


def _wait_until_lent(loader: ProcessLoader) -> None:
    """Until a load has taken the one worker: closed before, the stopped worker would be idle,
    and close() would end it as an idle one."""
    deadline = time.monotonic() + 60
    while not loader._idle.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loader._idle.empty(), "no load took the worker"


def test_close_fails_a_hung_load_at_once(tmp_path, arch):
    """Shutdown does not wait up to load_timeout_s on a read that never ends: close() kills
    the busy worker, its load fails, and the last worker's exit removes the exchange folder."""
    loader = ProcessLoader(max_workers=1, load_timeout_s=600)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    worker = stopped_worker(loader, ready=True)
    try:
        hung = pool.submit(loader, "a", good_adapter(tmp_path), arch)
        _wait_until_lent(loader)
        start = time.monotonic()
        loader.close()
        with pytest.raises(AdapterError, match="died"):
            hung.result(timeout=60)
        assert time.monotonic() - start < 60
        assert worker.proc.poll() == -signal.SIGKILL
        assert loader._workers == []
        assert loader.exchange_dir is None or not os.path.exists(loader.exchange_dir)
    finally:
        worker.proc.kill()  # without the fix, the load would hang the pool's shutdown
        pool.shutdown()


def test_closing_the_pager_does_not_wait_for_a_hung_load(make_pager: MakePager, tmp_path):
    loader = ProcessLoader(max_workers=1, load_timeout_s=600)
    pager = make_pager(loader=loader)
    worker = stopped_worker(loader, ready=True)
    pager.add_source("a", write(tmp_path, "a", "mixlora"))
    pager.acquire("a")
    _wait_until_lent(loader)
    watchdog = threading.Timer(60, worker.proc.kill)  # without the fix, close waits for it
    watchdog.start()
    start = time.monotonic()
    try:
        pager.close()
    finally:
        watchdog.cancel()
    assert time.monotonic() - start < 30
    assert worker.proc.poll() == -signal.SIGKILL


def test_close_kills_an_idle_worker_that_is_still_starting(tmp_path, arch):
    """A worker whose imports hang would never read the EOF that stops an idle one."""
    loader = ProcessLoader(max_workers=1)
    worker = stopped_worker(loader, ready=False)
    try:
        start = time.monotonic()
        loader.close()
        assert time.monotonic() - start < 20  # an EOF and a wait gave up only after 30 s
        assert worker.proc.poll() == -signal.SIGKILL
        assert loader._workers == []
        assert loader.exchange_dir is None or not os.path.exists(loader.exchange_dir)
    finally:
        worker.proc.kill()
