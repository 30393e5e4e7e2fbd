"""State dicts and pickles for the `.bin` reading tests."""

from __future__ import annotations

import os
import zipfile
from collections import OrderedDict

import torch


class MakesAFolder:
    """Unpickling this calls os.makedirs: reading it must never do that."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.makedirs, (self.marker,)


def mixed_state_dict() -> dict[str, torch.Tensor]:
    """Float dtypes, a Parameter, views at an offset and transposed, an empty tensor."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(6, 4, generator=g)
    return OrderedDict(
        w32=torch.randn(3, 5, generator=g),
        w16=torch.randn(2, 3, generator=g).half(),
        wbf16=torch.randn(4, generator=g).bfloat16(),
        param=torch.nn.Parameter(torch.randn(2, 2, generator=g), requires_grad=False),
        view=shared[1:4],  # a view at an offset into another tensor's storage
        transposed=shared.t(),  # strides of a transposed view
        whole=shared,
        empty=torch.zeros(0, 3),
    )


# Hand-written pickles for the fast reader's tests (protocol 2, as torch.save writes them).
REBUILD = b"ctorch._utils\n_rebuild_tensor_v2\n"
HOOKS = b"ccollections\nOrderedDict\n)R"  # OrderedDict()
FOUR_FLOATS = {"data/0": bytes(16)}


def write_archive(file: str, data_pkl: bytes, records: dict[str, bytes] | None = None) -> str:
    """A torch zip archive with a hand-written data.pkl and the given records."""
    writer = torch._C.PyTorchFileWriter(file)
    writer.write_record("data.pkl", data_pkl, len(data_pkl))
    for name, data in (records or {}).items():
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    return file


def _int(value: int) -> bytes:
    """BININT1 below 256, else LONG1."""
    if 0 <= value < 256:
        return b"K" + bytes([value])
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def storage_pickle(numel: int = 4) -> bytes:
    """The persistent id ('storage', FloatStorage, '0', 'cpu', numel), loaded (BINPERSID)."""
    key_and_location = b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
    storage_type = b"ctorch\nFloatStorage\n"
    return b"(X\x07\x00\x00\x00storage" + storage_type + key_and_location + _int(numel) + b"tQ"


def tensor_dict_pickle(
    size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0, numel: int = 4
) -> bytes:
    """{'w': _rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())}."""
    shape = b"(" + b"".join(map(_int, size)) + b"t(" + b"".join(map(_int, stride)) + b"t"
    args = storage_pickle(numel) + _int(offset) + shape + b"\x89" + HOOKS
    return b"\x80\x02}X\x01\x00\x00\x00w" + REBUILD + b"(" + args + b"tRs."


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].shape == tensor.shape, key
        assert got[key].stride() == tensor.stride(), key
        assert torch.equal(got[key], tensor), key


def recompressed(file: str, out: str) -> str:
    """The same archive with every record deflated."""
    with zipfile.ZipFile(file) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return out
