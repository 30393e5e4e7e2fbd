"""Tensors through a file on shared memory, from a load worker to the engine process.

The worker makes each tensor at an aligned offset of a shared mapping of the file
(`tensors_in_file`), stacks the adapter straight into them and sends their places in its reply;
the engine maps the file and views the tensors in place (`map_tensors`), with no copy: the
mapping is the adapter's host-tier copy.

A file is written in place, never truncated first, so that the engine can hand it to a later
load once nothing maps it any more (process_loader.py): that load's bytes then land in pages
that exist. Fresh pages are what this saves, and they can cost far more than the copy: on a VM
that reports freed memory to its host, writing a 28 MB adapter into a new file took 130-200 ms
of the worker's CPU in a serving run, against 4 ms into a reused one (bench/RESULTS.md, session
25).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import sys
from dataclasses import dataclass

import torch

_ALIGN = 64  # bytes: each tensor starts on a cache line
# A mapping keeps a duplicate of its file's descriptor unless told not to (Python 3.13+): with
# one mapped file per host-tier adapter that would be an open file each (on older Pythons the
# builder raises the soft limit on open files instead: process_loader.raise_open_files_limit).
_NO_FD_KEPT = {"trackfd": False} if sys.version_info >= (3, 13) else {}


@dataclass(frozen=True, slots=True)
class FileTensor:
    """A tensor's place in an exchange file."""

    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    offset: int  # in bytes, a multiple of _ALIGN

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous tensor's bytes, without a copy (any dtype, 0-d included)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def dtype_name(dtype: torch.dtype) -> str:
    """The name getattr(torch, name) turns back into dtype, e.g. "float32"."""
    return str(dtype).removeprefix("torch.")


def fresh_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """New contiguous host tensors with the values of tensors."""
    return [t.to("cpu", copy=True, memory_format=torch.contiguous_format) for t in tensors]


def file_places(
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
) -> tuple[dict[str, FileTensor], int]:
    """Where tensors of layout (name -> dtype, shape) lie in an exchange file, each at the next
    aligned offset in order, and the bytes up to the end of the last one."""
    places: dict[str, FileTensor] = {}
    offset = end = 0
    for key, (dtype, shape) in layout.items():
        place = FileTensor(dtype_name(dtype), shape, offset)
        places[key] = place
        end = offset + place.nbytes
        offset += -(-place.nbytes // _ALIGN) * _ALIGN
    return places, end


def layout_of(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {key: (tensor.dtype, tuple(tensor.shape)) for key, tensor in tensors.items()}


def tensors_in_file(
    path: str, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], trim_spare: bool
) -> tuple[dict[str, torch.Tensor], mmap.mmap | None, dict[str, FileTensor]]:
    """Uninitialised tensors of layout (name -> dtype, shape) as views of a shared mapping of
    path (created where missing), that mapping and their places (map_tensors', which trims a
    much longer file with trim_spare: the load worker leaves that to the engine's unpack).
    Every page they lie in is allocated first: a write through a mapping into a hole of a full
    tmpfs would be a SIGBUS, not an error. Raises OSError (no room, no folder)."""
    places, length = file_places(layout)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if length:
            os.posix_fallocate(fd, 0, length)
    finally:
        os.close(fd)
    mapped, mapping = map_tensors(path, places, trim_spare)
    return mapped, mapping, places


def copy_into_file(
    tensors: dict[str, torch.Tensor], path: str
) -> tuple[dict[str, torch.Tensor], mmap.mmap | None]:
    """Copies of the tensors (any strides) as views of a shared mapping of path: map_tensors'
    result, with each tensor copied straight into its place (tensors_in_file: no contiguous
    temporary, no write call). Raises OSError (no room, no folder)."""
    mapped, mapping, _ = tensors_in_file(path, layout_of(tensors), trim_spare=True)
    for key, tensor in tensors.items():
        mapped[key].copy_(tensor)
    return mapped, mapping


def raise_open_files_limit() -> None:
    """Where a mapping keeps its file open (Python < 3.13), lift this process's soft limit on
    open files to its hard limit (or 65536 under an unlimited one): a host tier of small
    adapters maps thousands of files, and a soft limit of 1024 is common. Process-wide, as
    servers commonly do; a limit that cannot be raised is left as it is."""
    if _NO_FD_KEPT:
        return
    try:
        import resource
    except ImportError:  # not POSIX: no exchange files either
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 16 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def map_tensors(
    path: str, places: dict[str, FileTensor], trim_spare: bool = True
) -> tuple[dict[str, torch.Tensor], mmap.mmap | None]:
    """The tensors at their places in path, as views of one shared mapping of it, and that
    mapping (None where there are no bytes to map): it lives as long as any of the tensors, so
    a weak reference to it tells when the file is free. With trim_spare, a file over twice as
    long as the tensors loses its tail. Raises OSError where the file is missing or ends inside
    a tensor."""
    length = max((place.offset + place.nbytes for place in places.values()), default=0)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size < length:
            raise OSError(f"exchange file {path} holds {size} bytes, its tensors {length}")
        if length == 0:
            empty = {
                k: torch.empty(p.shape, dtype=getattr(torch, p.dtype)) for k, p in places.items()
            }
            return empty, None
        # Shared (not private) and populated: the pages exist, so mapping them in one call
        # costs no fault per page, and a private writable map would copy each page instead.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapping = mmap.mmap(
            fd, length, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE, **_NO_FD_KEPT
        )
        if trim_spare and size > 2 * length:  # a spare of a bigger adapter: its tail is unused
            os.ftruncate(fd, length)
    finally:
        os.close(fd)
    # The tensors view the mapping through one memoryview: while they live it holds an export,
    # so the mapping cannot be closed under them (torch.frombuffer keeps only a reference).
    view = memoryview(mapping)
    tensors = {}
    for key, place in places.items():
        dtype = getattr(torch, place.dtype)
        flat = (
            torch.frombuffer(
                view, dtype=dtype, count=place.nbytes // dtype.itemsize, offset=place.offset
            )
            if place.nbytes
            else torch.empty(0, dtype=dtype)
        )
        tensors[key] = flat.view(place.shape)
    return tensors, mapping
