"""Adapter reads in worker processes, so they never hold the engine process's GIL.

A load holds the GIL for much of its time: unpickling a MoE-PEFT `.bin` (~1000 tensors; ~20 ms
for a 28 MB file through `bin_reader`, ~80 ms for files only torch's pure-Python weights-only
reader takes) and the Python of validating and stacking them. On a load thread of the engine
process that GIL is shared with the engine thread, which releases and re-takes it around every
torch op, and both slow down several times (measured on 2 cores with torch's reader: loads 2-4x
slower than alone, prefill steps beside them 3-8x). A worker process reads, validates and
stacks the adapter, then hands back its few stacked tensors.

The tensors travel through a file in the loader's own folder on shared memory (/dev/shm where
it exists: exchange_files.py, which also says why the engine recycles these files); the pipe
carries the skeleton. A pipe moves at most 1 MiB per read, and the load thread needs the GIL
back for each read from the stepping thread. Measured on 2
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
import mmap
import os
import pickle
import signal
import sys
from dataclasses import dataclass, field
from typing import IO, Any

import torch

from mixserve.adapters.errors import AdapterError
from mixserve.adapters.exchange_files import (
    FileTensor,
    dtype_name,
    map_tensors,
    raw_bytes,
    write_tensors,
)
from mixserve.adapters.files import AdapterFiles
from mixserve.adapters.spec import AdapterSpec, SiteKind
from mixserve.adapters.weights import AdapterWeights, SiteWeights
from mixserve.cpu_memory import keep_freed_memory
from mixserve.gc_freeze import freeze_startup_objects

READY = "ready"  # a worker's first reply: its imports are done
# "1": the worker keeps freed heap memory (set by the engine side, ProcessLoader)
KEEP_FREED_MEMORY_ENV = "MIXSERVE_WORKER_KEEP_FREED_MEMORY"


@dataclass(frozen=True, slots=True)
class PackedTensor:
    """A tensor as raw bytes: a bytearray unpickles as a writable buffer that the engine process
    wraps without another copy."""

    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    data: bytearray

    @staticmethod
    def of(tensor: torch.Tensor) -> PackedTensor:
        raw = raw_bytes(tensor.detach().contiguous())
        return PackedTensor(dtype_name(tensor.dtype), tuple(tensor.shape), bytearray(raw))

    def tensor(self) -> torch.Tensor:
        dtype = getattr(torch, self.dtype)
        if not self.data:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(self.data, dtype=dtype).view(self.shape)


@dataclass(frozen=True, slots=True)
class PackedWeights:
    """AdapterWeights as a picklable skeleton plus its tensors: in exchange_file at the places
    file_tensors gives or, without one, as raw bytes in tensors."""

    spec: AdapterSpec
    files: AdapterFiles
    site_kinds: dict[str, SiteKind]
    tensors: dict[str, PackedTensor]
    exchange_file: str | None = None
    file_tensors: dict[str, FileTensor] = field(default_factory=dict)


def _named_tensors(weights: AdapterWeights) -> dict[str, torch.Tensor]:
    """Every tensor of the weights under a flat name (unpack_weights reads them back)."""
    tensors: dict[str, torch.Tensor] = {}
    for proj, site in weights.sites.items():
        tensors[f"{proj}.lora_a"] = site.lora_a
        tensors[f"{proj}.lora_b"] = site.lora_b
        tensors[f"{proj}.scale"] = site.scale
        if site.router is not None:
            tensors[f"{proj}.router"] = site.router
    if weights.ffn_router is not None:
        tensors["ffn_router"] = weights.ffn_router
    return tensors


# Free space an exchange folder's filesystem keeps for other loads and processes: below it,
# unpacked tensors are copied out of their file instead of keeping it mapped.
MIN_FREE_SHARED_BYTES = 1 << 30


def _room_to_keep_mapped(exchange_file: str) -> bool:
    try:
        stats = os.statvfs(os.path.dirname(exchange_file))
    except OSError:  # the tensors are read: copying them out is the safe answer
        return False
    return stats.f_bavail * stats.f_frsize >= MIN_FREE_SHARED_BYTES


def pack_weights(weights: AdapterWeights, exchange_file: str | None = None) -> PackedWeights:
    """The weights as a skeleton plus their tensors: written into exchange_file (a path the
    engine chose and owns: it removes or reuses the file whatever becomes of this worker) or,
    where that cannot be written or is None, as raw bytes."""
    tensors = _named_tensors(weights)
    kinds = {proj: site.kind for proj, site in weights.sites.items()}
    if exchange_file is not None:
        try:
            places = write_tensors(tensors, exchange_file)
            return PackedWeights(weights.spec, weights.files, kinds, {}, exchange_file, places)
        except OSError:  # no room, no folder: the pipe carries the bytes
            with contextlib.suppress(OSError):
                os.unlink(exchange_file)  # a half-written file would hold memory of a full one
    packed = {key: PackedTensor.of(t) for key, t in tensors.items()}
    return PackedWeights(weights.spec, weights.files, kinds, packed)


def unpack_weights(packed: PackedWeights) -> tuple[AdapterWeights, mmap.mmap | None]:
    """The weights, and the mapping of the exchange file they view (None where they own their
    memory): the file must not be written again while that mapping lives.

    Mapped, the tensors are the adapter's host-tier copy, with no copy made (on CUDA, pinning
    copies them anyway). In a small shared-memory folder (Docker's default /dev/shm: 64 MiB)
    host-tier mappings would fill it and every later load would take the slower pipe, so
    there they are copied out."""
    if packed.exchange_file is None:
        tensors = {key: p.tensor() for key, p in packed.tensors.items()}
        mapping = None
    else:
        tensors, mapping = map_tensors(packed.exchange_file, packed.file_tensors)
        if mapping is not None and not _room_to_keep_mapped(packed.exchange_file):
            tensors = {key: tensor.clone() for key, tensor in tensors.items()}
            mapping = None  # the views are gone with the old dict: nothing maps the file
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
    weights = AdapterWeights(packed.spec, sites, tensors.get("ffn_router"), packed.files)
    return weights, mapping


def _serve(requests: IO[bytes], replies: IO[bytes]) -> None:
    from mixserve.adapters.loader import load_adapter

    pickle.dump(READY, replies, pickle.HIGHEST_PROTOCOL)
    replies.flush()
    while True:
        try:
            name, path, arch, exchange_file = pickle.load(requests)
        except EOFError:
            return
        try:
            weights = load_adapter(name, path, arch)
            reply: tuple[bool, Any] = (True, pack_weights(weights, exchange_file))
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
    settle_worker_memory(os.environ.get(KEEP_FREED_MEMORY_ENV) == "1")
    _serve(sys.stdin.buffer, replies)


def settle_worker_memory(keep_freed: bool) -> None:
    """Once the worker's imports are done (this module's imports include the whole load
    path), what outlives every load stops costing each load: the imported objects leave the
    garbage collector's generations (a MoE-PEFT file's ~1000 tensors and their records
    trigger collections, and each full one walked torch's imports: a 28 MB MixLoRA load alone
    went from 66 to 48 ms on 2 vCPUs). With keep_freed (a CPU engine that tunes malloc), a
    load's stacking buffers come back from glibc's heap instead of fresh mappings (fresh pages
    are slow where the hypervisor backs them lazily: bench/RESULTS.md, session 23)."""
    freeze_startup_objects()
    if keep_freed:
        keep_freed_memory()


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: the classes it pickles must be
    # mixserve.adapters.load_worker's for the engine process to unpickle them.
    from mixserve.adapters import load_worker

    load_worker.main()
