"""Finding and reading an adapter folder's files: config JSON and weights (.safetensors or .bin).

`.bin` files are pickles. A plain state dict is read by `bin_reader` (the C unpickler with every
global a stand-in of ours); anything else goes to ``torch.load(weights_only=True)``, which
refuses anything but tensors and plain containers. Nothing else ever unpickles them.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mixserve.adapters.bin_reader import NotPlainStateDict, read_bin_state_dict
from mixserve.adapters.errors import (
    AdapterConfigError,
    AdapterFileError,
    AdapterNotFoundError,
    AdapterValueError,
)

# Preferred first. The mixlora_* pair is the oldest m-LoRA MixLoRA naming.
CONFIG_FILE_NAMES = ("adapter_config.json", "mixlora_config.json")
WEIGHT_FILE_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "mixlora_model.bin")
logger = logging.getLogger(__name__)

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


def _read_bin(name: str, path: str) -> Any:
    try:
        return read_bin_state_dict(path)
    except NotPlainStateDict as exc:
        logger.debug("adapter '%s': %s, read by torch's weights-only reader", name, exc)
    try:
        # Not memory-mapped: torch's mapped reads take a compressed record's bytes for its
        # values, and plain files (where mapping paid) are bin_reader's.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise AdapterFileError(
            name,
            f"not a plain tensor file: refused to unpickle ({_refusal_reason(exc)})",
            file=path,
        ) from exc
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError) as exc:
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
    if any(value.requires_grad for value in loaded.values()):
        # torch.load rebuilds saved Parameters with their flag; weights are data here (stacking
        # with out= refuses inputs that require grad, and a copy would build a graph).
        loaded = {key: value.detach() for key, value in loaded.items()}
    return loaded
