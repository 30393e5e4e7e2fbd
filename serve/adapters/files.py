"""Finding and reading an adapter folder's files: config JSON and weights (.safetensors or .bin).

`.bin` files are pickles: nothing in them may run code. A file first goes through torch.load with
an unpickler that resolves only the globals a plain state dict names (``_TensorsOnly``: the
ordered dict, torch's tensor and parameter rebuilders; torch resolves storage types itself); a
file that names anything else is read again by ``torch.load(weights_only=True)``, which accepts
what it accepts (and refuses the rest with its own message). Both refuse everything that is not
a tensor or a plain container.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import re
from dataclasses import dataclass
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mixserve.adapters.errors import (
    AdapterConfigError,
    AdapterFileError,
    AdapterNotFoundError,
    AdapterValueError,
)

# Preferred first. The mixlora_* pair is the oldest m-LoRA MixLoRA naming.
CONFIG_FILE_NAMES = ("adapter_config.json", "mixlora_config.json")
WEIGHT_FILE_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "mixlora_model.bin")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True, slots=True)
class AdapterFiles:
    config_path: str
    weights_path: str


def find_adapter_files(name: str, adapter_dir: str) -> AdapterFiles:
    if not os.path.isdir(adapter_dir):
        raise AdapterNotFoundError(name, "no such adapter folder", file=adapter_dir)
    config = next(
        (p for p in CONFIG_FILE_NAMES if os.path.isfile(os.path.join(adapter_dir, p))), None
    )
    if config is None:
        raise AdapterNotFoundError(name, "missing adapter_config.json", file=adapter_dir)
    weights = next(
        (p for p in WEIGHT_FILE_NAMES if os.path.isfile(os.path.join(adapter_dir, p))), None
    )
    if weights is None:
        raise AdapterNotFoundError(
            name, "missing adapter_model.safetensors / adapter_model.bin", file=adapter_dir
        )
    return AdapterFiles(os.path.join(adapter_dir, config), os.path.join(adapter_dir, weights))


def read_config(name: str, path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterFileError(name, f"unreadable ({exc})", file=path) from exc
    except ValueError as exc:
        raise AdapterConfigError(name, f"invalid JSON ({exc})", file=path) from exc


def _refusal_reason(exc: Exception) -> str:
    """The informative line of torch's weights_only refusal (it names the refused global)."""
    lines = [_ANSI.sub("", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if "Unsupported global" in line or "WeightsUnpickler error" in line:
            return line
    return lines[0] if lines else type(exc).__name__


# What torch.load raises for a file it cannot read (after the refusals, UnpicklingError).
_READ_ERRORS = (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError, TypeError)


class _TensorsOnlyUnpickler(pickle.Unpickler):
    """The C unpickler, resolving no global but those a plain state dict of tensors names.

    Why not only torch's weights-only unpickler: it is pure Python. A MoE-PEFT file of ~1000
    tensors (28 MB) took 84 ms through it and 33-37 ms through this one (2026-12-05). Every
    callable a pickle can call comes from find_class, so the pickle can build nothing but
    ordered dicts and tensors over the file's own storages; torch's wrapper resolves storage
    types (dtype tags) itself before asking here.
    """

    # torch's rebuilders are private names: one a later torch drops is left out, and files that
    # name it go to the weights-only reader.
    _ALLOWED: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        **{
            ("torch._utils", name): getattr(torch._utils, name)
            for name in ("_rebuild_tensor_v2", "_rebuild_parameter")
            if hasattr(torch._utils, name)
        },
    }

    def find_class(self, module: str, name: str) -> Any:
        found = self._ALLOWED.get((module, name))
        if found is None:
            raise _NotPlain(f"{module}.{name}")
        return found


class _NotPlain(pickle.UnpicklingError):
    """The fast path's refusal: torch's weights-only unpickler judges the file instead."""


class _TensorsOnly:
    """A pickle_module for torch.load (the interface: Unpickler and load)."""

    Unpickler = _TensorsOnlyUnpickler

    @staticmethod
    def load(file: IO[bytes], **kwargs: Any) -> Any:
        return _TensorsOnlyUnpickler(file, **kwargs).load()


def _read_plain_bin(path: str) -> Any:
    """The file's state dict through the fast unpickler (torch's zip format, memory-mapped), or
    None where it cannot say: another global, the legacy format (it cannot be mapped), a corrupt
    file. The weights-only read then judges the file and words the error."""
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, mmap=True, pickle_module=_TensorsOnly
        )
    except (pickle.UnpicklingError, *_READ_ERRORS):
        return None


def _read_bin(name: str, path: str) -> Any:
    try:
        loaded = _read_plain_bin(path)
        if loaded is not None:
            return loaded
        try:
            # Memory-mapped: tensors are read straight from the page cache (~15% faster for
            # MoE-PEFT's ~1000 small tensors); the loader copies them into its stacks.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files of torch's legacy (pre-zip) format cannot be mapped.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AdapterFileError(
            name,
            f"not a plain tensor file: refused to unpickle ({_refusal_reason(exc)})",
            file=path,
        ) from exc
    except _READ_ERRORS as exc:
        raise AdapterFileError(name, f"truncated or corrupt file ({exc})", file=path) from exc


def read_weights(name: str, path: str) -> dict[str, torch.Tensor]:
    """All tensors of a weights file on CPU, keyed by name; anything else is an error."""
    if path.endswith(".safetensors"):
        try:
            loaded: Any = load_file(path, device="cpu")
        except (SafetensorError, OSError) as exc:
            raise AdapterFileError(
                name, f"truncated or corrupt safetensors file ({exc})", file=path
            ) from exc
    else:
        loaded = _read_bin(name, path)
    if not isinstance(loaded, dict):
        raise AdapterFileError(
            name, f"holds a {type(loaded).__name__}, not a dict of named tensors", file=path
        )
    for key, value in loaded.items():
        if not isinstance(key, str):
            raise AdapterFileError(name, f"holds a non-string key {key!r}", file=path)
        if not isinstance(value, torch.Tensor):
            raise AdapterValueError(
                name, f"is a {type(value).__name__}, not a tensor", file=path, key=key
            )
    return loaded
