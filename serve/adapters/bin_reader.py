"""A fast reader for the plain state dicts that `torch.save` writes (MoE-PEFT's `.bin`).

torch's weights-only unpickler is pure Python: ~85 of the ~110 ms that loading a 28 MB,
990-tensor MoE-PEFT adapter takes. This reader runs the C unpickler on the archive's data.pkl
instead, made safe by what it can reach rather than by what it checks:

- Before it runs, data.pkl is scanned (`_check_opcodes`): only the opcodes that `torch.save`
  writes for a dict of tensors at protocol 2 may appear, and memo indices stay below 2**20. So
  no BUILD, no object creation but through REDUCE, no extension codes (their registry is
  process-wide), and no 5-byte pickle that makes the C unpickler size its memo to gigabytes.
- Every global the pickle names resolves to a `_StandIn` of ours, never to a function, class or
  module of this process. A stand-in has no state the pickle can change (no ``__dict__``, no
  ``__setstate__``, ``__setattr__`` refuses), and calling one (REDUCE) only returns a `_Call`
  record, as inert. What the pickle builds is therefore only plain data (dicts, lists, tuples,
  numbers, strings) and our records; BUILD, SETITEM and APPEND on a stand-in or record fail.
- The archive is read by `torch_archive.TorchArchive`: the zip module's directory and local
  headers, nothing run (``torch.load(weights_only=False)`` would hand a TorchScript archive to
  ``torch.jit.load``).
- Tensors are made afterwards as views of the archive's private map of the file, each checked
  to lie inside its own storage record, which must be stored uncompressed (as torch.save writes
  them). The map is not a snapshot: the file's bytes are read as the tensors are used (the
  loader copies them at once), and a file truncated meanwhile raises SIGBUS.

What the pickle describes (each tensor's storage, type, shape, strides and offset, checked) is a
function of data.pkl's bytes alone and is kept for the last few distinct pickles: a file whose
data.pkl equals one read before is not scanned or unpickled again, only its records are checked
and viewed. Adapters saved from one config for one base model share their pickle, and that was
~2/3 of reading a 990-tensor MoE-PEFT file (15 -> 5 ms).

Not closed, here or in torch's reader: a crafted pickle can hang either (a dict key of tuples
nested as a DAG, whose hash takes 2**depth steps) or crash it (a key nested ~200,000 deep
overflows the C stack while hashed). That is one reason reads run in load worker processes,
which a load timeout kills (process_loader.py).

Tensors come back as plain tensors (a saved Parameter's requires_grad is dropped: adapters are
inference weights). Anything else (another opcode or global, a big-endian or legacy-format file,
an argument of an unusual form) raises `NotPlainStateDict`, and the caller reads the file with
``torch.load(weights_only=True)``, which accepts or refuses it with its own message.
"""

from __future__ import annotations

import functools
import io
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from mixserve.adapters.torch_archive import ArchiveError, TorchArchive

# Storage classes a state dict names, by global name.
_STORAGE_DTYPES = {
    "torch.FloatStorage": torch.float32,
    "torch.DoubleStorage": torch.float64,
    "torch.HalfStorage": torch.float16,
    "torch.BFloat16Storage": torch.bfloat16,
    "torch.LongStorage": torch.int64,
    "torch.IntStorage": torch.int32,
    "torch.ShortStorage": torch.int16,
    "torch.CharStorage": torch.int8,
    "torch.ByteStorage": torch.uint8,
    "torch.BoolStorage": torch.bool,
}
_REBUILD_TENSOR = "torch._utils._rebuild_tensor_v2"
_REBUILD_PARAMETER = "torch._utils._rebuild_parameter"
_ORDERED_DICT = "collections.OrderedDict"
_CALLABLE = (_REBUILD_TENSOR, _REBUILD_PARAMETER)


class NotPlainStateDict(Exception):
    """The file is not a plain little-endian state dict this reader understands."""


def _refuse(reason: str) -> NoReturn:
    raise NotPlainStateDict(reason)


# A run of the fixed-size opcodes of a protocol-2 state dict: EMPTY_DICT, EMPTY_TUPLE, MARK,
# TUPLE, TUPLE1-3, NEWTRUE, NEWFALSE, NONE, REDUCE, BINPERSID, SETITEM, SETITEMS; BINPUT,
# BINGET, BININT1; BININT2; BININT, LONG_BINGET; LONG_BINPUT below 2**20 (a memo index sizes
# the C unpickler's memo to twice it: a legitimate file's indices stay below its opcode count).
# At most 4096 opcodes a match: `re` keeps a backtracking entry (~115 bytes) per repeat, so an
# unbounded `*` took ~1 GB to scan 10 MB of MARKs.
_FIXED_SIZE_RUN = re.compile(
    rb"(?:[})(t\x85\x86\x87\x88\x89NRQsu]|[qhK].|M..|[Jj]....|r..[\x00-\x0f]\x00){0,4096}",
    re.DOTALL,
)
_MAX_GLOBAL_LINE = 256


def _check_opcodes(data: bytes) -> None:
    """Refuse data.pkl unless it is PROTO 2, then runs of `_FIXED_SIZE_RUN` and the
    variable-size opcodes BINUNICODE, GLOBAL and LONG1, then STOP as its last byte. C-speed
    except one Python step per string, global or long."""
    if not data.startswith(b"\x80\x02"):
        _refuse("not a protocol-2 pickle")
    pos, end = 2, len(data)
    while True:
        match = _FIXED_SIZE_RUN.match(data, pos)
        assert match is not None  # the run may be empty
        if match.end() > pos:
            pos = match.end()
            continue
        if pos >= end:
            _refuse("the pickle ends without STOP")
        op = data[pos]
        if op == 0x58:  # BINUNICODE: 4-byte length, then the UTF-8 bytes
            pos += 5 + int.from_bytes(data[pos + 1 : pos + 5], "little")
        elif op == 0x63:  # GLOBAL: module and name, each on its own line
            first = data.find(b"\n", pos + 1, pos + _MAX_GLOBAL_LINE)
            second = data.find(b"\n", first + 1, first + _MAX_GLOBAL_LINE)
            if first < 0 or second < 0:
                _refuse("a global of an unusual form")
            pos = second + 1
        elif op == 0x8A:  # LONG1: 1-byte length, then the little-endian integer
            pos += 2 + (data[pos + 1] if pos + 1 < end else 0)
        elif op == 0x2E and pos == end - 1:  # STOP
            return
        else:
            _refuse(f"opcode {bytes([op])!r} at byte {pos}")


class _StandIn:
    """What a global of the pickle resolves to: its name, immutable. Calling it records the
    call; `collections.OrderedDict` gives a fresh plain dict (SETITEMS fills it)."""

    __slots__ = ("name",)
    name: str

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", name)

    def __setattr__(self, key: str, value: object) -> NoReturn:
        _refuse(f"the pickle sets {key!r} on {self.name}")

    def __delattr__(self, key: str) -> NoReturn:
        _refuse(f"the pickle deletes {key!r} of {self.name}")

    def __call__(self, *args: object) -> object:
        if self.name == _ORDERED_DICT and not args:
            return {}
        if self.name not in _CALLABLE:
            _refuse(f"the pickle calls {self.name}")
        return _Call(self.name, args)


class _Call:
    """A stand-in's call or a persistent id, as (name, args); immutable like `_StandIn`."""

    __slots__ = ("name", "args")
    name: str
    args: tuple[object, ...]

    def __init__(self, name: str, args: tuple[object, ...]) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "args", args)

    def __setattr__(self, key: str, value: object) -> NoReturn:
        _refuse(f"the pickle sets {key!r} on a result of {self.name}")

    def __delattr__(self, key: str) -> NoReturn:
        _refuse(f"the pickle deletes {key!r} of a result of {self.name}")


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> _StandIn:
        full_name = f"{module}.{name}"
        if full_name not in _STORAGE_DTYPES and full_name not in (*_CALLABLE, _ORDERED_DICT):
            _refuse(f"the pickle names {full_name}")
        return _StandIn(full_name)

    def persistent_load(self, pid: object) -> _Call:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            _refuse("a persistent id other than a storage")
        return _Call("storage", pid[1:])


def _is_index(value: object) -> bool:
    return type(value) is int and 0 <= value < 2**62


def _is_shape(value: object) -> bool:
    return type(value) is tuple and all(_is_index(v) for v in value)


@dataclass(frozen=True, slots=True)
class _TensorRecord:
    """A tensor the pickle describes: values[offset + sum(i * stride)] of storage data/<key>,
    which holds numel values of dtype. Checked to lie inside it."""

    key: str
    dtype: torch.dtype
    numel: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def _storage(ref: object) -> tuple[str, torch.dtype, int]:
    """A storage's (key, dtype, numel)."""
    if not (isinstance(ref, _Call) and ref.name == "storage"):
        _refuse("a tensor without a storage")
    storage_type, key, location, numel = ref.args
    if not isinstance(storage_type, _StandIn) or storage_type.name not in _STORAGE_DTYPES:
        _refuse("a storage of an unknown type")
    if type(key) is not str or type(location) is not str or not _is_index(numel):
        _refuse("a storage id of an unusual form")
    assert isinstance(numel, int)
    return key, _STORAGE_DTYPES[storage_type.name], numel


def _tensor_record(value: object) -> _TensorRecord:
    if not isinstance(value, _Call):
        _refuse("a value that is not a tensor")
    if value.name == _REBUILD_PARAMETER:  # (data, requires_grad, backward_hooks)
        data = value.args[0] if len(value.args) == 3 else None
        if not (isinstance(data, _Call) and data.name == _REBUILD_TENSOR) or value.args[2] != {}:
            _refuse("a parameter of other arguments or with hooks")
        value = data
    args = value.args  # (storage, offset, size, stride, requires_grad, hooks[, metadata])
    if value.name != _REBUILD_TENSOR or len(args) not in (6, 7):
        _refuse(f"a call of {value.name} with {len(args)} arguments")
    storage_ref, offset, size, stride, requires_grad, hooks = args[:6]
    if not (_is_index(offset) and _is_shape(size) and _is_shape(stride)):
        _refuse("a tensor of an unusual offset, size or stride")
    assert isinstance(size, tuple) and isinstance(stride, tuple) and isinstance(offset, int)
    if len(size) != len(stride) or type(requires_grad) is not bool or hooks != {}:
        _refuse("a tensor with hooks or mismatched size and stride")
    if len(args) == 7 and args[6] not in (None, {}):
        _refuse("a tensor with metadata")
    key, dtype, numel = _storage(storage_ref)
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= numel:
            _refuse("a tensor past the end of its storage")
    return _TensorRecord(key, dtype, numel, size, stride, offset)


@functools.lru_cache(maxsize=16)
def _tensor_records(data_pkl: bytes) -> tuple[tuple[Any, _TensorRecord], ...]:
    """data.pkl's tensors, scanned, unpickled and checked: a function of its bytes alone, so
    kept for the last few distinct pickles. Adapters trained with one config for one base
    model save the same pickle (keys, storage ids, shapes), and this is ~2/3 of a read."""
    _check_opcodes(data_pkl)
    try:
        loaded = _Unpickler(io.BytesIO(data_pkl)).load()
    except NotPlainStateDict:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here only means "not plain"
        raise NotPlainStateDict(f"unpickling failed ({type(exc).__name__}: {exc})") from exc
    if type(loaded) is not dict:
        _refuse("not a dict")
    records = tuple((key, _tensor_record(value)) for key, value in loaded.items())
    storages: dict[str, tuple[torch.dtype, int]] = {}
    for _, record in records:
        named = storages.setdefault(record.key, (record.dtype, record.numel))
        if named != (record.dtype, record.numel):
            _refuse(f"storage {record.key} is named with two types or sizes")
    return records


def read_bin_state_dict(path: str) -> dict[Any, torch.Tensor]:
    """A `torch.save`d dict of tensors, as views of a private map of the file.

    Raises NotPlainStateDict for anything else, and where the file cannot be read or its
    archive is damaged: the caller then reads it with ``torch.load(weights_only=True)``, which
    says what is wrong.
    """
    try:
        return _read(path)
    except zipfile.BadZipFile as exc:  # torch's legacy format, or not torch's
        raise NotPlainStateDict(f"not a torch zip archive ({exc})") from exc
    except ArchiveError as exc:
        raise NotPlainStateDict(str(exc)) from exc
    except (RuntimeError, OSError, ValueError, OverflowError, struct.error) as exc:
        # A damaged archive or record (the zip module's, the map's or torch's errors: a tensor
        # too large to index).
        raise NotPlainStateDict(f"{type(exc).__name__}: {exc}") from exc


def _read(path: str) -> dict[Any, torch.Tensor]:
    archive = TorchArchive(path)
    if archive.byteorder not in (None, b"little"):
        _refuse("a big-endian file")
    storages: dict[str, tuple[torch.Tensor, int]] = {}
    tensors = {}
    for key, record in _tensor_records(archive.data_pkl):
        storage = storages.get(record.key)
        if storage is None:
            storage = storages[record.key] = archive.values(record.key, record.dtype, record.numel)
        values, first = storage
        tensors[key] = values.as_strided(record.size, record.stride, first + record.offset)
    return tensors
