"""Tensors through a file on shared memory, from a load worker to the engine process.

The worker writes each tensor's bytes at an aligned offset (`write_tensors`) and sends the
places in its reply; the engine maps the file and views the tensors in place (`map_tensors`),
with no copy: the mapping is the adapter's host-tier copy.

A file is written in place, never truncated, so that the engine can hand it to a later load
once nothing maps it any more (process_loader.py): that load's bytes then land in pages that
exist. Fresh pages are what this saves, and they can cost far more than the copy: on a VM that
reports freed memory to its host, writing a 28 MB adapter into a new file took 130-200 ms of
the worker's CPU in a serving run, against 4 ms into a reused one (bench/RESULTS.md, session
25).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import torch

_ALIGN = 64  # bytes: each tensor starts on a cache line


@dataclass(frozen=True, slots=True)
class FileTensor:
    """A tensor's place in an exchange file."""

    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    offset: int  # in bytes, a multiple of _ALIGN

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * getattr(torch, self.dtype).itemsize


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous tensor's bytes, without a copy (any dtype, 0-d included)."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def write_tensors(tensors: dict[str, torch.Tensor], path: str) -> dict[str, FileTensor]:
    """Writes the tensors into path (created where missing) in place, past nothing it does
    not need: a longer file keeps its tail and its size. Raises OSError (no room, no folder)."""
    places: dict[str, FileTensor] = {}
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        offset = 0
        for key, tensor in tensors.items():
            raw = _raw_bytes(tensor.detach().contiguous())
            dtype = str(tensor.dtype).removeprefix("torch.")
            places[key] = FileTensor(dtype, tuple(tensor.shape), offset)
            written = 0
            while written < raw.nbytes:  # a write may be short (a signal, a full filesystem)
                written += os.pwrite(fd, raw[written:], offset + written)
            offset += -(-raw.nbytes // _ALIGN) * _ALIGN
    finally:
        os.close(fd)
    return places


def map_tensors(
    path: str, places: dict[str, FileTensor]
) -> tuple[dict[str, torch.Tensor], mmap.mmap | None]:
    """The tensors at their places in path, as views of one shared mapping of it, and that
    mapping (None where there are no bytes to map): it lives as long as any of the tensors, so
    a weak reference to it tells when the file is free. Raises OSError where the file is
    missing or ends inside a tensor."""
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
        mapping = mmap.mmap(fd, length, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    tensors = {}
    for key, place in places.items():
        dtype = getattr(torch, place.dtype)
        flat = (
            torch.frombuffer(
                mapping, dtype=dtype, count=place.nbytes // dtype.itemsize, offset=place.offset
            )
            if place.nbytes
            else torch.empty(0, dtype=dtype)
        )
        tensors[key] = flat.view(place.shape)
    return tensors, mapping
