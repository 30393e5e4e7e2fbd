"""A fast reader for the plain state dicts that `torch.save` writes (MoE-PEFT's `.bin`).

torch's weights-only unpickler is pure Python: ~85 of the ~110 ms that loading a 28 MB,
990-tensor MoE-PEFT adapter takes. This reader runs the C unpickler on the archive's data.pkl
instead, made safe by what it can reach rather than by what it checks:

- Every global the pickle names resolves to a `_StandIn` of ours, never to a function, class or
  module of this process. A stand-in has no state the pickle can change (no ``__dict__``, no
  ``__setstate__``, ``__setattr__`` refuses), and calling one (REDUCE) only returns a `_Call`
  record, as inert. What the pickle builds is therefore only plain data (dicts, lists, tuples,
  numbers, strings) and our records; BUILD, SETITEM and APPEND on a stand-in or record fail.
- The archive is opened with `torch._C.PyTorchFileReader`, which reads records and runs nothing:
  ``torch.load(weights_only=False)`` would hand a TorchScript archive to ``torch.jit.load``.
- Tensors are made afterwards, from the records, as views of a private map of the file, each
  checked to lie inside its own storage record.

Anything else (another global, a big-endian or legacy-format file, an argument of an unusual
form) raises `NotPlainStateDict`, and the caller reads the file with
``torch.load(weights_only=True)``, which accepts or refuses it with its own message.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, NoReturn

import torch

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
    "torch.UntypedStorage": torch.uint8,  # numel counts bytes
}
_REBUILD_TENSOR = "torch._utils._rebuild_tensor_v2"
_REBUILD_PARAMETER = "torch._utils._rebuild_parameter"
_ORDERED_DICT = "collections.OrderedDict"
_CALLABLE = (_REBUILD_TENSOR, _REBUILD_PARAMETER)


class NotPlainStateDict(Exception):
    """The file is not a plain little-endian state dict this reader understands."""


def _refuse(reason: str) -> NoReturn:
    raise NotPlainStateDict(reason)


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


class _Storages:
    """Each storage record of the archive as a typed 1-D tensor over the file's map, made once
    per key and checked against the record's size."""

    def __init__(self, reader: torch._C.PyTorchFileReader, path: str) -> None:
        self._reader = reader
        try:
            self._file = torch.UntypedStorage.from_file(path, False, os.path.getsize(path))
        except RuntimeError as exc:
            raise NotPlainStateDict(f"cannot map the file ({exc})") from exc
        self._made: dict[str, tuple[torch.dtype, int, torch.Tensor]] = {}

    def get(self, ref: object) -> torch.Tensor:
        if not (isinstance(ref, _Call) and ref.name == "storage"):
            _refuse("a tensor without a storage")
        storage_type, key, location, numel = ref.args
        if not isinstance(storage_type, _StandIn) or storage_type.name not in _STORAGE_DTYPES:
            _refuse("a storage of an unknown type")
        if type(key) is not str or type(location) is not str or not _is_index(numel):
            _refuse("a storage id of an unusual form")
        dtype = _STORAGE_DTYPES[storage_type.name]
        made = self._made.get(key)
        if made is not None:
            if made[:2] != (dtype, numel):
                _refuse(f"storage {key} is named with two types or sizes")
            return made[2]
        record = f"data/{key}"
        if not self._reader.has_record(record):
            _refuse(f"no record {record}")
        nbytes = numel * dtype.itemsize
        if self._reader.get_record_size(record) != nbytes:
            _refuse(f"record {record} does not hold {numel} {dtype} values")
        offset = self._reader.get_record_offset(record)
        storage = torch.empty(0, dtype=dtype).set_(self._file[offset : offset + nbytes])
        self._made[key] = (dtype, numel, storage)
        return storage


def _tensor(value: object, storages: _Storages) -> torch.Tensor:
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
    storage = storages.get(storage_ref)
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.shape[0]:
            _refuse("a tensor past the end of its storage")
    return storage.as_strided(size, stride, offset)


def read_bin_state_dict(path: str) -> dict[Any, torch.Tensor]:
    """A `torch.save`d dict of tensors, as views of a private (copy-on-write) map of the file.

    Raises NotPlainStateDict for anything else, or OSError where the file cannot be read; the
    caller then reads it with ``torch.load(weights_only=True)``.
    """
    try:
        reader = torch._C.PyTorchFileReader(path)
    except RuntimeError as exc:  # not a zip archive: torch's legacy format, or not torch's
        raise NotPlainStateDict(f"not a torch zip archive ({exc})") from exc
    if reader.has_record("byteorder") and reader.get_record("byteorder") != b"little":
        _refuse("a big-endian file")
    if not reader.has_record("data.pkl"):
        _refuse("no data.pkl")
    try:
        loaded = _Unpickler(io.BytesIO(reader.get_record("data.pkl"))).load()
    except NotPlainStateDict:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here only means "not plain"
        raise NotPlainStateDict(f"unpickling failed ({type(exc).__name__}: {exc})") from exc
    if type(loaded) is not dict:
        _refuse("not a dict")
    storages = _Storages(reader, path)
    return {key: _tensor(value, storages) for key, value in loaded.items()}
