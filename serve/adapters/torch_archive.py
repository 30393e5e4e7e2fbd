"""The records of a torch zip archive (what `torch.save` writes), by the zip module's reading of
its directory, with the stored ones as typed views of one private map of the file.

Nothing here runs anything from the file: it reads a zip directory and local headers. A record's
values are only taken where it is stored uncompressed (as torch.save stores them): a compressed
record's bytes at its offset are not its values. The map is private, so writes to the views
stay in this process, and like ``torch.load(mmap=True)`` it is not a snapshot: the bytes are
read as the views are used, and a file truncated meanwhile raises SIGBUS.

Reading records through the zip module's directory and our own parse of each local header, not
through `torch._C.PyTorchFileReader` (miniz), costs ~1 us a record instead of ~6 (four miniz
calls, each a name lookup), and leaves one parser's word for where each record lies. miniz
matches names without case, so an archive with two names differing only in case is refused:
torch's reader could take the other record.
"""

from __future__ import annotations

import mmap
import struct
import zipfile
from typing import NoReturn

import torch

# A local file header: signature, 22 bytes we do not need, then the name's and the extra
# field's lengths; the record's bytes follow both.
_LOCAL_HEADER = struct.Struct("<4s22xHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"


class ArchiveError(Exception):
    """The file is not a torch zip archive of the form this reader takes."""


def _refuse(reason: str) -> NoReturn:
    raise ArchiveError(reason)


class TorchArchive:
    """data.pkl's bytes, the byte order record, and every stored record under data/ (by key)
    as values of one map of the file.

    Raises ArchiveError for an archive of an unusual form, zipfile.BadZipFile for a file that
    is no zip archive, and OSError, ValueError or struct.error for a damaged one."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as file:
            with zipfile.ZipFile(file) as archive:
                entries = archive.infolist()
                names = [entry.filename for entry in entries]
                if not entries or len({name.lower() for name in names}) != len(names):
                    _refuse("an archive with no records, or two of one name but for case")
                prefix = names[0].split("/", 1)[0] + "/"
                if prefix + "data.pkl" not in names:
                    _refuse("no data.pkl")
                self.data_pkl = archive.read(prefix + "data.pkl")
                byteorder_name = prefix + "byteorder"
                self.byteorder = archive.read(byteorder_name) if byteorder_name in names else None
            # Private and writable: views of it may be written (the copies stay here).
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        data_prefix = prefix + "data/"
        self._records: dict[str, tuple[int, int]] = {}  # key -> (byte offset, byte size)
        self._compressed: set[str] = set()  # keys of records with no values to view
        for entry in entries:
            if not entry.filename.startswith(data_prefix):
                continue
            if entry.compress_type != zipfile.ZIP_STORED or entry.compress_size != entry.file_size:
                self._compressed.add(entry.filename.removeprefix(data_prefix))
                continue
            signature, name_length, extra_length = _LOCAL_HEADER.unpack_from(
                self._map, entry.header_offset
            )
            start = entry.header_offset + _LOCAL_HEADER.size + name_length + extra_length
            if signature != _LOCAL_SIGNATURE:
                _refuse(f"record {entry.filename} has no local header where the directory says")
            if start + entry.file_size > len(self._map):
                _refuse(f"record {entry.filename} lies outside the file")
            self._records[entry.filename.removeprefix(data_prefix)] = (start, entry.file_size)
        self._flat: dict[torch.dtype, torch.Tensor] = {}

    def values(self, key: str, dtype: torch.dtype, numel: int) -> tuple[torch.Tensor, int]:
        """(values, first): record data/<key> is values[first : first + numel], a 1-D tensor of
        dtype over the map. Records aligned to the dtype (torch.save aligns them to 64 bytes)
        share one such tensor per dtype; any other gets its own."""
        record = self._records.get(key)
        if record is None:
            if key in self._compressed:
                _refuse(f"record data/{key} is stored compressed")
            _refuse(f"no record data/{key}")
        start, size = record
        if size != numel * dtype.itemsize:
            _refuse(f"record data/{key} does not hold {numel} {dtype} values")
        if numel == 0:
            return torch.empty(0, dtype=dtype), 0
        if start % dtype.itemsize:
            return torch.frombuffer(self._map, dtype=dtype, count=numel, offset=start), 0
        flat = self._flat.get(dtype)
        if flat is None:
            flat = torch.frombuffer(self._map, dtype=dtype, count=len(self._map) // dtype.itemsize)
            self._flat[dtype] = flat
        return flat, start // dtype.itemsize
