"""Background adapter loads: worker threads read, validate and pin; the engine thread collects.

Workers run only `_load_job`, which touches no shared state and returns a value (or raises), so
the engine thread owns everything else. The engine's loader (`load_worker.ProcessLoader`) does
the read itself in a child process, so a worker thread mostly waits on a pipe without the GIL.
A failure is a value too (an `AdapterError`, with any unexpected exception wrapped), so it fails
only the requests for that adapter.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from mixserve.adapters.errors import AdapterError, AdapterFileError, AdapterNotFoundError
from mixserve.adapters.files import find_adapter_files
from mixserve.adapters.host_cache import pin_weights
from mixserve.adapters.pool import PoolShape
from mixserve.adapters.weights import AdapterWeights
from mixserve.model.arch import ArchConfig
from mixserve.torch_threads import single_threaded_torch

logger = logging.getLogger(__name__)

Loader = Callable[[str, str, ArchConfig], AdapterWeights]  # load_adapter's signature


def adapter_uid(name: str, path: str) -> int:
    """Identity of an adapter's files: realpath, device, inode, mtime_ns and size of its config
    and weights file, hashed to a non-negative 63-bit int.

    Equal for unchanged files, so prefix-cache entries survive eviction and reload; different
    when a file is rewritten or replaced (the inode catches an atomic rename even within one
    mtime tick) or the name points at another folder. Only stats files: cheap on the engine
    thread. Raises AdapterNotFoundError when a file is missing.
    """
    files = find_adapter_files(name, path)
    digest = hashlib.blake2b(digest_size=8)
    for file in (files.config_path, files.weights_path):
        try:
            st = os.stat(file)
        except OSError as exc:
            raise AdapterNotFoundError(name, f"cannot stat ({exc})", file=file) from exc
        ident = (os.path.realpath(file), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        digest.update(repr(ident).encode())
    return int.from_bytes(digest.digest(), "big") >> 1


@dataclass(frozen=True, slots=True)
class AdapterLoadResult:
    """One finished background load, as the pager's poll reports it."""

    name: str
    uid: int  # the identity the adapter's requests were given
    error: AdapterError | None  # None on success
    seconds: float  # worker time reading and validating (0 on failure)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class _Loaded:
    weights: AdapterWeights
    seconds: float


def _load_job(
    loader: Loader, name: str, path: str, arch: ArchConfig, shape: PoolShape, uid: int, pin: bool
) -> _Loaded:
    """Runs on a worker thread."""
    start = time.perf_counter()
    weights = loader(name, path, arch)
    shape.check_fits(weights)  # a misfit is this adapter's load error, not a failed step later
    seconds = time.perf_counter() - start
    # Checked after the read: files rewritten since the uid was taken have another identity, and
    # serving them under the old uid would let the prefix cache mix two adapters' blocks.
    if adapter_uid(name, path) != uid:
        raise AdapterFileError(name, "files changed while loading; retry the request", file=path)
    return _Loaded(pin_weights(weights) if pin else weights, seconds)


@dataclass(frozen=True, slots=True)
class LoadOutcome:
    result: AdapterLoadResult
    weights: AdapterWeights | None  # None on failure


LoadTicket = Future  # identifies one submitted load


class LoadQueue:
    """A worker pool for `_load_job`. Engine-thread API; counters cover every finished load.

    A load may be submitted held: it gets its ticket at once but reaches a worker only at
    `start` (an engine on CPU keeps loads that no request can use yet off the CPUs its
    prefill steps need: docs/ARCHITECTURE.md, "Loads that wait their turn").
    """

    def __init__(
        self, loader: Loader, arch: ArchConfig, shape: PoolShape, *, pin: bool, max_workers: int
    ) -> None:
        self._loader, self._arch, self._shape, self.pin = loader, arch, shape, pin
        self._executor = ThreadPoolExecutor(
            max_workers, thread_name_prefix="adapter-load", initializer=single_threaded_torch
        )
        self._pending: dict[Future[_Loaded], tuple[str, int]] = {}  # -> name, uid
        self._held: dict[Future[_Loaded], tuple[object, ...]] = {}  # -> job args, in order
        # Loads a worker thread is running now. A count kept by the jobs, not a scan of the
        # pending futures: a step reads it after every layer (ComputeThreadBudget.following).
        self._num_running = 0
        self._running_lock = threading.Lock()
        self.started = self.succeeded = self.failed = 0
        self.seconds = 0.0

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def num_running(self) -> int:
        """Loads a worker is running now (queued ones excluded)."""
        return self._num_running

    @property
    def num_held(self) -> int:
        return len(self._held)

    @property
    def num_started(self) -> int:
        """Loads queued for or running on a worker, not yet collected (held ones excluded)."""
        return len(self._pending) - len(self._held)

    def is_held(self, ticket: LoadTicket) -> bool:
        return ticket in self._held

    def submit(self, name: str, path: str, uid: int, *, hold: bool = False) -> LoadTicket:
        """A ticket for the load, which a worker runs now or, held, once `start` names it."""
        ticket: Future[_Loaded] = Future()
        self._held[ticket] = (self._loader, name, path, self._arch, self._shape, uid, self.pin)
        self._pending[ticket] = (name, uid)
        if not hold:
            self.start([ticket])
        return ticket

    def start(self, tickets: list[LoadTicket] | None = None) -> int:
        """Hand held loads to the workers, in the order they were submitted: those of tickets
        (others are ignored), or all. Returns how many started."""
        chosen = list(self._held) if tickets is None else [t for t in tickets if t in self._held]
        for ticket in chosen:
            self._executor.submit(self._run, ticket, self._held.pop(ticket))
        self.started += len(chosen)
        return len(chosen)

    def _run(self, ticket: Future[_Loaded], args: tuple[object, ...]) -> None:
        """On a worker thread: the load, counted in num_running until just before its ticket
        is done (a caller woken by the ticket sees the count without it)."""
        if not ticket.set_running_or_notify_cancel():
            return  # cancelled while it waited for a worker
        with self._running_lock:
            self._num_running += 1
        error: Exception | None = None
        try:
            loaded = _load_job(*args)  # type: ignore[arg-type]
        except Exception as exc:  # the outcome of the load, collected like any other
            error = exc
        finally:
            with self._running_lock:
                self._num_running -= 1
        if error is not None:
            ticket.set_exception(error)
        else:
            ticket.set_result(loaded)

    def cancel(self, ticket: LoadTicket) -> None:
        """Drop a load nobody waits for; if it already runs, its outcome is still collected."""
        if ticket.cancel():
            self._pending.pop(ticket, None)
            self._held.pop(ticket, None)

    def collect(self) -> list[tuple[LoadTicket, LoadOutcome]]:
        """Finished loads, without blocking."""
        out = []
        for future in [f for f in self._pending if f.done()]:
            name, uid = self._pending.pop(future)
            out.append((future, self._outcome(name, uid, future)))
        return out

    def _outcome(self, name: str, uid: int, future: Future[_Loaded]) -> LoadOutcome:
        try:
            loaded = future.result()
        except AdapterError as exc:
            error = exc
        except Exception as exc:  # a bug or an OS error must still fail only this adapter
            error = AdapterError(name, f"unexpected {type(exc).__name__} while loading: {exc}")
            error.__cause__ = exc
        else:
            self.succeeded += 1
            self.seconds += loaded.seconds
            return LoadOutcome(AdapterLoadResult(name, uid, None, loaded.seconds), loaded.weights)
        self.failed += 1
        logger.warning("%s", error)
        return LoadOutcome(AdapterLoadResult(name, uid, error, 0.0), None)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until some load finishes; False if none is started or the timeout passed."""
        started = [f for f in self._pending if f not in self._held]
        if not started:
            return False
        done, _ = wait(started, timeout=timeout, return_when=FIRST_COMPLETED)
        return bool(done)

    def close(self) -> None:
        """Cancel queued loads and stop the workers. A loader with worker processes
        (ProcessLoader) is closed first, which fails its running loads at once; in-process
        loads are let finish."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        for ticket in self._pending:  # held ones, and queued ones the shutdown dropped
            ticket.cancel()
        close_loader = getattr(self._loader, "close", None)  # ProcessLoader
        if close_loader is not None:
            close_loader()
        self._executor.shutdown(wait=True)
        self._pending.clear()
        self._held.clear()
