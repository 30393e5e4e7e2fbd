"""The engine side of the load workers (mixserve.adapters.load_worker says why they exist):
`ProcessLoader` starts, lends, replaces and stops them."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import pickle
import queue
import select
import shutil
import subprocess
import sys
import threading
import weakref

from mixserve.adapters.errors import AdapterError
from mixserve.adapters.exchange_dirs import (
    DEFAULT_MAX_SPARE_BYTES,
    ExchangeFiles,
    make_exchange_dir,
)
from mixserve.adapters.load_worker import KEEP_FREED_MEMORY_ENV, READY, unpack_weights
from mixserve.adapters.weights import AdapterWeights
from mixserve.model.arch import ArchConfig

logger = logging.getLogger(__name__)


class _Worker:
    """One child process; used by one load thread at a time."""

    def __init__(self, keep_freed_memory: bool = False) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # its CPU is the engine's too
        env[KEEP_FREED_MEMORY_ENV] = "1" if keep_freed_memory else "0"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mixserve.adapters.load_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self.proc.stdout is not None
        # Replies are tens of MB: a 1 MiB pipe (Linux's default cap for unprivileged
        # processes) instead of 64 KiB cuts the context switches 16x.
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
        self._ready = False  # its first reply, READY, has been read

    def await_ready(self, timeout_s: float | None = None) -> None:
        """Block until the worker has imported what loads need (its first reply); raises
        OSError, EOFError or pickle.UnpicklingError where it died instead, TimeoutError where
        it has not replied within timeout_s."""
        if self._ready:
            return
        assert self.proc.stdout is not None
        self._await_reply(timeout_s)
        reply = pickle.load(self.proc.stdout)
        if reply != READY:
            raise pickle.UnpicklingError(f"expected the worker's ready reply, got {reply!r}")
        self._ready = True

    def _await_reply(self, timeout_s: float | None) -> None:
        """Raises TimeoutError unless the worker's next reply starts within timeout_s (None:
        no limit)."""
        if timeout_s is not None and not self._replies_within(timeout_s):
            raise TimeoutError(f"no reply in {timeout_s:g} s")

    def _replies_within(self, timeout_s: float) -> bool:
        """Whether the worker's next reply starts within timeout_s."""
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        return bool(readable)

    def load(
        self,
        name: str,
        path: str,
        arch: ArchConfig,
        exchange_file: str | None,
        timeout_s: float | None = None,
    ) -> tuple[AdapterWeights, mmap.mmap | None]:
        """One load, as unpack_weights returns it, its tensors through exchange_file where that
        is not None; timeout_s bounds the worker's start (if it has not replied READY yet) and,
        separately, the time until its reply starts (reading, validating, stacking, writing the
        exchange file). A worker that misses either is killed and the load fails."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.await_ready(timeout_s)
            pickle.dump((name, path, arch, exchange_file), self.proc.stdin, pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
            self._await_reply(timeout_s)
            ok, value = pickle.load(self.proc.stdout)
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            self.kill(exchange_file)
            raise AdapterError(
                name, f"the adapter load worker was killed: {exc} (load_timeout_s)"
            ) from exc
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            self.kill(exchange_file)
            raise AdapterError(
                name, f"the adapter load worker died ({exc!r}, exit code {self.proc.poll()})"
            ) from exc
        except BaseException:
            # Anything else once the request may be out (Ctrl-C): its reply would be taken for
            # the next request's.
            self.kill(exchange_file)
            raise
        if not ok:
            raise value
        try:
            return unpack_weights(value)
        except OSError as exc:  # its exchange file is gone or cut short
            raise AdapterError(name, f"the load worker's tensors are unreadable ({exc})") from exc

    def kill(self, exchange_file: str | None = None) -> None:
        """Kill the worker (hung or mid-load) and remove what it may have written for a load."""
        self.proc.kill()
        self.close()
        if exchange_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(exchange_file)

    @property
    def ready(self) -> bool:
        """Its READY reply has been read (its imports are done)."""
        return self._ready

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            # EOF: the worker exits after its current read. A broken pipe: it is gone already.
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class ProcessLoader:
    """`load_adapter` (the Loader signature) run in up to max_workers child processes.

    Thread-safe: a load thread takes an idle worker (starting one while fewer than max_workers
    exist) and waits on its pipe with the GIL released. Errors come back as the same typed
    AdapterErrors; a worker that dies, or is still reading after load_timeout_s (then killed),
    fails its load and is replaced by the next one.
    """

    def __init__(
        self,
        max_workers: int,
        load_timeout_s: float | None = None,
        *,
        keep_freed_memory: bool = False,
        max_spare_bytes: int = DEFAULT_MAX_SPARE_BYTES,
    ) -> None:
        """keep_freed_memory: the workers raise glibc's thresholds as a CPU engine does
        (cpu_memory.py; the engine passes its own choice). max_spare_bytes: what exchange
        files that nothing maps may keep for later loads."""
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self._max_workers = max_workers
        self._load_timeout_s = load_timeout_s  # None: wait as long as a read takes
        self._keep_freed_memory = keep_freed_memory
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._closed = False
        self.exchange_dir = make_exchange_dir()
        self._exchange_files = ExchangeFiles(self.exchange_dir, max_spare_bytes)
        # A loader dropped without close() (an LLM that goes out of scope) still ends its
        # workers (they exit at the EOF on their stdin) and removes its exchange folder.
        self._finalizer = weakref.finalize(self, _hang_up, self._workers, self.exchange_dir)

    @property
    def exchange_files(self) -> ExchangeFiles:
        return self._exchange_files

    def start(self) -> None:
        """Start one worker now (it imports torch while the caller goes on), so the first load
        does not wait for that."""
        with self._lock:
            if not self._workers and not self._closed:
                self._idle.put(self._spawn())

    def wait_until_ready(self, timeout_s: float | None = None) -> None:
        """Block until the worker start() began has imported torch and the loader (~2 s from
        its spawn on 2 vCPUs), so the first load takes a load's time, not an import's too. A
        worker that died meanwhile, or has not replied within timeout_s (default: the load
        timeout, which also bounds a start during a load), is dropped with an error logged:
        the next load starts another and fails with the reason if that one dies too."""
        try:
            worker = self._idle.get_nowait()
        except queue.Empty:
            return  # not started, closed, or already lent to a load (which waits itself)
        try:
            worker.await_ready(self._load_timeout_s if timeout_s is None else timeout_s)
        except TimeoutError as exc:
            logger.error("the adapter load worker hung while starting: %s; killed", exc)
            worker.kill()
            self._drop(worker)
            return
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            if not self._closed:  # else close() killed it
                logger.error(
                    "the adapter load worker failed while starting (exit code %s): %r",
                    worker.proc.poll(),
                    exc,
                )
            self._drop(worker)
            return
        except BaseException:  # e.g. Ctrl-C during the wait: the worker is not lost untracked
            self._drop(worker)
            raise
        with self._lock:
            if not self._closed:
                self._idle.put(worker)
                return
        self._drop(worker)  # the loader closed while the worker started

    def _drop(self, worker: _Worker) -> None:
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
            last = self._closed and not self._workers
        worker.close()
        if last:
            self._finalizer()

    def _spawn(self) -> _Worker:
        worker = _Worker(self._keep_freed_memory)
        self._workers.append(worker)
        return worker

    def _take(self) -> _Worker:
        """An idle worker, else a new one while fewer than max_workers exist (also after one
        was killed or died while this load waited), else wait for one to come back."""
        while True:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the adapter loader is closed")
                try:
                    return self._idle.get_nowait()
                except queue.Empty:
                    if len(self._workers) < self._max_workers:
                        return self._spawn()
            with contextlib.suppress(queue.Empty):  # re-check closing and counts each 0.5 s
                return self._idle.get(timeout=0.5)

    def __call__(self, name: str, path: str, arch: ArchConfig) -> AdapterWeights:
        worker = self._take()
        exchange_file = self._exchange_files.take()
        mapping = None
        loaded = False
        try:
            weights, mapping = worker.load(name, path, arch, exchange_file, self._load_timeout_s)
            loaded = True
            return weights
        finally:
            with self._lock:
                keep = worker.alive and not self._closed
                if keep:
                    self._idle.put(worker)
            if mapping is None:
                # A killed worker may have been writing into its file, and a failed unpack's
                # traceback may still view it: only a load that succeeded gives its file back.
                self._exchange_files.give_back(exchange_file, reuse=keep and loaded)
            else:  # the file is the adapter's host copy until its tensors are freed
                weakref.finalize(mapping, self._exchange_files.give_back, exchange_file, reuse=True)
            if not keep:
                self._drop(worker)

    def close(self) -> None:
        """Stop the idle workers and kill the busy ones: their loads fail at once, instead of
        shutdown waiting up to load_timeout_s on a hung read. A killed worker's load thread
        drops it (and the last one removes the exchange folder)."""
        with self._lock:
            self._closed = True
            self._exchange_files.close()
            idle = []
            while True:
                try:
                    idle.append(self._idle.get_nowait())
                except queue.Empty:
                    break
            for worker in idle:
                self._workers.remove(worker)
            busy = list(self._workers)
        for worker in busy:
            # Only the signal: the load thread owns the pipes (closing one under its read is
            # unsafe) and sees EOF.
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
        for worker in idle:
            if worker.ready:
                worker.close()  # EOF: it exits
            else:
                worker.kill()  # still importing, and maybe hung there: EOF would wait on it
        if not busy:  # else the last busy load's _drop removes the folder
            self._finalizer()


def _hang_up(workers: list[_Worker], exchange_dir: str | None) -> None:
    for worker in workers:
        if worker.proc.stdin is not None and not worker.proc.stdin.closed:
            with contextlib.suppress(OSError):
                worker.proc.stdin.close()
    if exchange_dir is not None:
        shutil.rmtree(exchange_dir, ignore_errors=True)
