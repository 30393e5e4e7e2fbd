"""Adapter reads in worker processes, so they never hold the engine process's GIL.

A load holds the GIL for much of its time: unpickling a MoE-PEFT `.bin` (~1000 tensors; ~20 ms
for a 28 MB file through `bin_reader`, ~80 ms for files only torch's pure-Python weights-only
reader takes) and the Python of validating and stacking them. On a load thread of the engine
process that GIL is shared with the engine thread, which releases and re-takes it around every
torch op, and both slow down several times (measured on 2 cores with torch's reader: loads 2-4x
slower than alone, prefill steps beside them 3-8x). A worker process reads, validates and
stacks the adapter, then hands back its few stacked tensors.

The tensors travel through a safetensors file in the loader's own folder on shared memory
(/dev/shm where it exists); the pipe carries the skeleton. A pipe moves at most 1 MiB per read,
and the load thread needs the GIL back for each read from the stepping thread. Measured on 2
vCPUs with a 27 MB adapter: alone, 108 ms this way against 117 through the pipe; in a serving
run both took 230-440 ms once decode steps ran beside them (fresh pages fault in slowly there),
and a paired A/B of that run gave 142/147 tok/s with the file against 137/139 with the pipe.
Where the folder cannot take the file (a full /dev/shm: Docker's default is 64 MiB), the bytes
go through the pipe.

Workers are plain `python -m mixserve.adapters.load_worker` children speaking pickles over their
stdin/stdout, not multiprocessing: its spawn and forkserver children re-import the caller's
main module, which breaks scripts without an `if __name__ == "__main__"` guard, and fork is
unsafe in a process with running threads. Pickles are fine here: both ends are mixserve.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pickle
import queue
import select
import shutil
import signal
import subprocess
import sys
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mixserve.adapters.errors import AdapterError
from mixserve.adapters.exchange_dirs import make_exchange_dir
from mixserve.adapters.files import AdapterFiles
from mixserve.adapters.spec import AdapterSpec, SiteKind
from mixserve.adapters.weights import AdapterWeights, SiteWeights
from mixserve.model.arch import ArchConfig

logger = logging.getLogger(__name__)

READY = "ready"  # a worker's first reply: its imports are done
# How long build_engine waits for that reply (~2 s on 2 vCPUs; a loaded machine or a slow
# filesystem may take many times that) before it kills the worker: a hung import must not
# keep the engine from starting.
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class PackedTensor:
    """A tensor as raw bytes: a bytearray unpickles as a writable buffer that the engine process
    wraps without another copy."""

    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    data: bytearray

    @staticmethod
    def of(tensor: torch.Tensor) -> PackedTensor:
        raw = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
        dtype = str(tensor.dtype).removeprefix("torch.")
        return PackedTensor(dtype, tuple(tensor.shape), bytearray(raw))

    def tensor(self) -> torch.Tensor:
        dtype = getattr(torch, self.dtype)
        if not self.data:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(self.data, dtype=dtype).view(self.shape)


@dataclass(frozen=True, slots=True)
class PackedWeights:
    """AdapterWeights as a picklable skeleton plus its tensors: in exchange_file (safetensors,
    removed by unpack_weights) or, without one, as raw bytes."""

    spec: AdapterSpec
    files: AdapterFiles
    site_kinds: dict[str, SiteKind]
    tensors: dict[str, PackedTensor]
    exchange_file: str | None = None


def pack_weights(weights: AdapterWeights, exchange_dir: str | None = None) -> PackedWeights:
    tensors: dict[str, torch.Tensor] = {}
    for proj, site in weights.sites.items():
        tensors[f"{proj}.lora_a"] = site.lora_a
        tensors[f"{proj}.lora_b"] = site.lora_b
        tensors[f"{proj}.scale"] = site.scale
        if site.router is not None:
            tensors[f"{proj}.router"] = site.router
    if weights.ffn_router is not None:
        tensors["ffn_router"] = weights.ffn_router
    kinds = {proj: site.kind for proj, site in weights.sites.items()}
    if exchange_dir is not None:
        path = os.path.join(exchange_dir, f"{uuid.uuid4().hex}.safetensors")
        try:
            save_file({key: t.contiguous() for key, t in tensors.items()}, path)
            return PackedWeights(weights.spec, weights.files, kinds, {}, path)
        except (OSError, SafetensorError):  # no room, no folder: the pipe carries the bytes
            with contextlib.suppress(OSError):
                os.unlink(path)
    packed = {key: PackedTensor.of(t) for key, t in tensors.items()}
    return PackedWeights(weights.spec, weights.files, kinds, packed)


def unpack_weights(packed: PackedWeights) -> AdapterWeights:
    if packed.exchange_file is not None:
        try:
            tensors = load_file(packed.exchange_file)
        finally:
            os.unlink(packed.exchange_file)
    else:
        tensors = {key: p.tensor() for key, p in packed.tensors.items()}
    sites = {
        proj: SiteWeights(
            kind=kind,
            lora_a=tensors[f"{proj}.lora_a"],
            lora_b=tensors[f"{proj}.lora_b"],
            scale=tensors[f"{proj}.scale"],
            router=tensors.get(f"{proj}.router"),
        )
        for proj, kind in packed.site_kinds.items()
    }
    return AdapterWeights(packed.spec, sites, tensors.get("ffn_router"), packed.files)


class _Worker:
    """One child process; used by one load thread at a time."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # its CPU is the engine's too
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
        if timeout_s is not None:
            readable, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
            if not readable:
                raise TimeoutError(f"no reply in {timeout_s:g} s")
        reply = pickle.load(self.proc.stdout)
        if reply != READY:
            raise pickle.UnpicklingError(f"expected the worker's ready reply, got {reply!r}")
        self._ready = True

    def load(
        self, name: str, path: str, arch: ArchConfig, exchange_dir: str | None
    ) -> AdapterWeights:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.await_ready()
            pickle.dump((name, path, arch, exchange_dir), self.proc.stdin, pickle.HIGHEST_PROTOCOL)
            self.proc.stdin.flush()
            ok, value = pickle.load(self.proc.stdout)
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            self.close()
            raise AdapterError(
                name, f"the adapter load worker died ({exc!r}, exit code {self.proc.poll()})"
            ) from exc
        if not ok:
            raise value
        try:
            return unpack_weights(value)
        except (OSError, SafetensorError) as exc:  # its exchange file is gone or unreadable
            raise AdapterError(name, f"the load worker's tensors are unreadable ({exc})") from exc

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
    AdapterErrors; a worker that dies fails its load and is replaced by the next one.
    """

    def __init__(self, max_workers: int) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self._max_workers = max_workers
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._closed = False
        self.exchange_dir = make_exchange_dir()
        # A loader dropped without close() (an LLM that goes out of scope) still ends its
        # workers (they exit at the EOF on their stdin) and removes its exchange folder.
        self._finalizer = weakref.finalize(self, _hang_up, self._workers, self.exchange_dir)

    def start(self) -> None:
        """Start one worker now (it imports torch while the caller goes on), so the first load
        does not wait for that."""
        with self._lock:
            if not self._workers and not self._closed:
                self._idle.put(self._spawn())

    def wait_until_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Block until the worker start() began has imported torch and the loader (~2 s from
        its spawn on 2 vCPUs), so the first load takes a load's time, not an import's too. A
        worker that died meanwhile, or has not replied within timeout_s, is dropped with an
        error logged: the next load starts another and fails with the reason if that one dies
        too."""
        try:
            worker = self._idle.get_nowait()
        except queue.Empty:
            return  # not started, closed, or already lent to a load (which waits itself)
        try:
            worker.await_ready(timeout_s)
        except TimeoutError as exc:
            logger.error("the adapter load worker hung while starting: %s; killed", exc)
            worker.proc.kill()
            self._drop(worker)
            return
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
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
        worker = _Worker()
        self._workers.append(worker)
        return worker

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise RuntimeError("the adapter loader is closed")
            try:
                return self._idle.get_nowait()
            except queue.Empty:
                if len(self._workers) < self._max_workers:
                    return self._spawn()
        while True:  # every worker is busy: wait for one, unless the loader closes meanwhile
            try:
                return self._idle.get(timeout=0.5)
            except queue.Empty:
                if self._closed:
                    raise RuntimeError("the adapter loader is closed") from None

    def __call__(self, name: str, path: str, arch: ArchConfig) -> AdapterWeights:
        worker = self._take()
        try:
            return worker.load(name, path, arch, self.exchange_dir)
        finally:
            with self._lock:
                if worker.alive and not self._closed:
                    self._idle.put(worker)
                else:
                    if worker in self._workers:
                        self._workers.remove(worker)
                    if self._closed:
                        worker.close()
                        if not self._workers:
                            self._finalizer()

    def close(self) -> None:
        """Stop the idle workers; a busy one stops when its load returns."""
        with self._lock:
            self._closed = True
            idle = []
            while True:
                try:
                    idle.append(self._idle.get_nowait())
                except queue.Empty:
                    break
            for worker in idle:
                self._workers.remove(worker)
        for worker in idle:
            worker.close()
        if not self._workers:  # else the last busy load's finalizer removes the folder
            self._finalizer()


def _hang_up(workers: list[_Worker], exchange_dir: str | None) -> None:
    for worker in workers:
        if worker.proc.stdin is not None and not worker.proc.stdin.closed:
            with contextlib.suppress(OSError):
                worker.proc.stdin.close()
    if exchange_dir is not None:
        shutil.rmtree(exchange_dir, ignore_errors=True)


def _serve(requests: IO[bytes], replies: IO[bytes]) -> None:
    from mixserve.adapters.loader import load_adapter

    pickle.dump(READY, replies, pickle.HIGHEST_PROTOCOL)
    replies.flush()
    while True:
        try:
            name, path, arch, exchange_dir = pickle.load(requests)
        except EOFError:
            return
        try:
            weights = load_adapter(name, path, arch)
            reply: tuple[bool, Any] = (True, pack_weights(weights, exchange_dir))
        except AdapterError as exc:
            reply = (False, exc)
        except Exception as exc:  # noqa: BLE001 - any failure fails this adapter only
            reply = (False, AdapterError(name, f"unexpected {type(exc).__name__}: {exc}"))
        pickle.dump(reply, replies, pickle.HIGHEST_PROTOCOL)
        replies.flush()


def main() -> None:
    # Ctrl-C in a terminal reaches the whole process group: the engine process decides when its
    # workers stop (EOF on their stdin), so they ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The replies own the real stdout; anything a library prints goes to stderr instead.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    torch.set_num_threads(1)
    _serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: the classes it pickles must be
    # mixserve.adapters.load_worker's for the engine process to unpickle them.
    from mixserve.adapters import load_worker

    load_worker.main()
