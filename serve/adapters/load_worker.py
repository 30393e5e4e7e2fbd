"""Adapter reads in worker processes, so they never hold the engine process's GIL.

A load holds the GIL for much of its time: reading a MoE-PEFT `.bin` (~1000 tensors; 5-15 ms
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
    tensors_in_file,
)
from mixserve.adapters.files import AdapterFiles
from mixserve.adapters.loader import load_adapter, new_host_tensors
from mixserve.adapters.spec import AdapterSpec, SiteKind
from mixserve.adapters.weights import FFN_ROUTER, AdapterWeights, SiteWeights, site_tensor_name
from mixserve.cpu_memory import keep_freed_memory
from mixserve.gc_freeze import freeze_startup_objects
from mixserve.model.arch import ArchConfig

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


# Free space an exchange folder's filesystem keeps for other loads and processes: below it,
# unpacked tensors are copied out of their file instead of keeping it mapped.
MIN_FREE_SHARED_BYTES = 1 << 30


def _room_to_keep_mapped(exchange_file: str) -> bool:
    try:
        stats = os.statvfs(os.path.dirname(exchange_file))
    except OSError:  # the tensors are read: copying them out is the safe answer
        return False
    return stats.f_bavail * stats.f_frsize >= MIN_FREE_SHARED_BYTES


def pack_weights(
    weights: AdapterWeights, in_file: tuple[str, dict[str, FileTensor]] | None = None
) -> PackedWeights:
    """The weights as a skeleton plus their tensors: in_file, the exchange file they were made
    in and their places there, else as raw bytes (for the pipe)."""
    kinds = {proj: site.kind for proj, site in weights.sites.items()}
    if in_file is None:
        packed = {key: PackedTensor.of(t) for key, t in weights.named_tensors().items()}
        return PackedWeights(weights.spec, weights.files, kinds, packed)
    exchange_file, places = in_file
    assert places.keys() == weights.named_tensors().keys()
    return PackedWeights(weights.spec, weights.files, kinds, {}, exchange_file, places)


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
            lora_a=tensors[site_tensor_name(proj, "lora_a")],
            lora_b=tensors[site_tensor_name(proj, "lora_b")],
            scale=tensors[site_tensor_name(proj, "scale")],
            router=tensors.get(site_tensor_name(proj, "router")),
        )
        for proj, kind in packed.site_kinds.items()
    }
    weights = AdapterWeights(packed.spec, sites, tensors.get(FFN_ROUTER), packed.files)
    return weights, mapping


class _ExchangeTarget:
    """new_tensors for a load: the stacks made straight in the exchange file (no stacking
    buffer and no copy into the file after it: ~3 ms of a 28 MB load's ~15), else, where the
    file cannot take them (no room, no folder, none given), in this process's memory."""

    def __init__(self, exchange_file: str | None) -> None:
        self.exchange_file = exchange_file
        self.places: dict[str, FileTensor] | None = None

    def __call__(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        if self.exchange_file is not None:
            layout = {name: (torch.float32, shape) for name, shape in shapes.items()}
            try:
                tensors, _, self.places = tensors_in_file(
                    self.exchange_file, layout, trim_spare=False
                )
                return tensors
            except OSError:  # no room, no folder: the pipe carries the bytes
                with contextlib.suppress(OSError):
                    os.unlink(self.exchange_file)  # a half-allocated file holds memory
        return new_host_tensors(shapes)


def load_packed(
    name: str, path: str, arch: ArchConfig, exchange_file: str | None = None
) -> PackedWeights:
    """load_adapter's weights, packed: made in exchange_file (a path the engine chose and owns:
    it removes or reuses the file whatever becomes of this worker) or, where that cannot take
    them or is None, as raw bytes. The tensors made here die on return (the file stays)."""
    target = _ExchangeTarget(exchange_file)
    weights = load_adapter(name, path, arch, target)
    in_file = None
    if target.places is not None and exchange_file is not None:
        in_file = (exchange_file, target.places)
    return pack_weights(weights, in_file)


def _serve(requests: IO[bytes], replies: IO[bytes]) -> None:
    pickle.dump(READY, replies, pickle.HIGHEST_PROTOCOL)
    replies.flush()
    while True:
        try:
            name, path, arch, exchange_file = pickle.load(requests)
        except EOFError:
            return
        try:
            reply: tuple[bool, Any] = (True, load_packed(name, path, arch, exchange_file))
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
