"""How a load worker process hands an adapter's stacked tensors to the engine process.

Each worker writes them into its own buffer file in the loader's folder on shared memory
(/dev/shm where it exists), reused from load to load; the engine process copies them out, and
the pipe carries only the skeleton (names, shapes, offsets). Why not:
- the pipe: it moves at most 1 MiB per read, and the engine's load thread needs the GIL back
  for each read, which the stepping thread holds for up to the interpreter's 5 ms switch
  interval (a 27 MB adapter: 280 ms beside a running engine, 120 ms alone);
- a new file per load: writing fresh tmpfs pages ran 9 ms early in a serving run and 150-440 ms
  once decode steps ran beside it (measured on 2 vCPUs), while writing the same bytes into
  pages a buffer already holds stayed at 4 ms.
The buffer grows by posix_fallocate, so a full /dev/shm (Docker's default is 64 MiB) is an
error at that call, never a SIGBUS on a write; without room the bytes go through the pipe.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from mixserve.adapters.files import AdapterFiles
from mixserve.adapters.spec import AdapterSpec, SiteKind
from mixserve.adapters.weights import AdapterWeights, SiteWeights

_ALIGN = 64  # bytes; every tensor starts at a multiple, so each view is aligned for its dtype
_GROWTH = 16 * 2**20  # the buffer grows in steps of this many bytes


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


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
        return PackedTensor(_dtype_name(tensor), tuple(tensor.shape), bytearray(raw))

    def tensor(self) -> torch.Tensor:
        dtype = getattr(torch, self.dtype)
        if not self.data:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(self.data, dtype=dtype).view(self.shape)


@dataclass(frozen=True, slots=True)
class BufferPlace:
    """Where a tensor lies in a worker's buffer file."""

    dtype: str
    shape: tuple[int, ...]
    offset: int  # bytes, a multiple of _ALIGN
    nbytes: int


@dataclass(frozen=True, slots=True)
class PackedWeights:
    """AdapterWeights as a picklable skeleton; its tensors are in buffer_file (at `placed`) or,
    without one, raw bytes in `tensors`."""

    spec: AdapterSpec
    files: AdapterFiles
    site_kinds: dict[str, SiteKind]
    tensors: dict[str, PackedTensor] = field(default_factory=dict)
    placed: dict[str, BufferPlace] = field(default_factory=dict)
    buffer_file: str | None = None
    buffer_size: int = 0


class ExchangeBuffer:
    """The worker's side of one buffer file: grown as needed, written in place, reused."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = 0
        self._view: torch.Tensor | None = None  # [size] uint8, the file mapped shared

    def _reserve(self, nbytes: int) -> bool:
        if nbytes <= self.size:
            return True
        size = -(-nbytes // _GROWTH) * _GROWTH
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)  # the pages now, or ENOSPC now
            finally:
                os.close(fd)
        except (OSError, AttributeError):  # no room, no folder, no posix_fallocate (macOS)
            return False
        self._view = torch.from_file(self.path, shared=True, size=size, dtype=torch.uint8)
        self.size = size
        return True

    def put(self, tensors: dict[str, torch.Tensor]) -> dict[str, BufferPlace] | None:
        """Write every tensor into the buffer; None (nothing written) if it cannot hold them."""
        places, offset = {}, 0
        for key, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            places[key] = BufferPlace(_dtype_name(tensor), tuple(tensor.shape), offset, nbytes)
            offset += -(-nbytes // _ALIGN) * _ALIGN
        if not self._reserve(offset):
            return None
        assert self._view is not None
        for key, tensor in tensors.items():
            place = places[key]
            raw = tensor.detach().contiguous().view(-1).view(torch.uint8)
            self._view[place.offset : place.offset + place.nbytes].copy_(raw)
        return places


def _named_tensors(weights: AdapterWeights) -> dict[str, torch.Tensor]:
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


def pack_weights(weights: AdapterWeights, buffer: ExchangeBuffer | None = None) -> PackedWeights:
    """The worker's reply: tensors in the buffer where it can hold them, else as raw bytes."""
    tensors = _named_tensors(weights)
    kinds = {proj: site.kind for proj, site in weights.sites.items()}
    placed = buffer.put(tensors) if buffer is not None else None
    if placed is not None and buffer is not None:
        return PackedWeights(
            weights.spec,
            weights.files,
            kinds,
            placed=placed,
            buffer_file=buffer.path,
            buffer_size=buffer.size,
        )
    packed = {key: PackedTensor.of(t) for key, t in tensors.items()}
    return PackedWeights(weights.spec, weights.files, kinds, tensors=packed)


def _copied_out(packed: PackedWeights) -> dict[str, torch.Tensor]:
    """The buffer's tensors as the engine's own copies (the worker rewrites it next load)."""
    assert packed.buffer_file is not None
    view = torch.from_file(
        packed.buffer_file, shared=True, size=packed.buffer_size, dtype=torch.uint8
    )
    out = {}
    for key, place in packed.placed.items():
        raw = view[place.offset : place.offset + place.nbytes]
        dtype = getattr(torch, place.dtype)
        out[key] = raw.view(dtype).view(place.shape).clone()
    return out  # the mapping goes with `view`


def unpack_weights(packed: PackedWeights) -> AdapterWeights:
    if packed.buffer_file is not None:
        tensors = _copied_out(packed)
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
