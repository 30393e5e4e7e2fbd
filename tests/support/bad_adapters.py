"""Helpers for the bad-adapter tests: write a good synthetic adapter, break one thing in it, and
check that load_adapter raises the documented typed error naming the adapter, the file and the
key."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

from mixserve.adapters import AdapterError, load_adapter
from mixserve.model import ArchConfig
from support.adapter_files import BaseDims, write_adapter
from support.tiny_models import tiny_config

DIMS = BaseDims.of(tiny_config("llama"))
CONFIG = "adapter_config.json"
BIN = "adapter_model.bin"
SAFETENSORS = "adapter_model.safetensors"
DROP = object()  # edit_config: remove the key


def good_adapter(tmp_path: Any, strategy: str | None = "mixlora", **kw: Any) -> str:
    name = kw.pop("name", str(strategy))
    return write_adapter(str(tmp_path / name), DIMS, strategy, **kw)


def edit_config(path: str, **changes: object) -> str:
    file = os.path.join(path, CONFIG)
    with open(file) as f:
        config = json.load(f)
    for key, value in changes.items():
        if value is DROP:
            config.pop(key, None)
        else:
            config[key] = value
    with open(file, "w") as f:
        json.dump(config, f)
    return file


def edit_weights(path: str, edit: Callable[[dict[str, torch.Tensor]], object]) -> str:
    """Apply `edit` to the tensors of an adapter_model.bin in place; returns the file."""
    file = os.path.join(path, BIN)
    weights = torch.load(file, weights_only=True)
    weights = {k: v.detach().clone() for k, v in weights.items()}
    edit(weights)
    torch.save(weights, file)
    return file


def save_raw(path: str, obj: object) -> str:
    file = os.path.join(path, BIN)
    torch.save(obj, file)
    return file


def load_fails(
    error: type[AdapterError],
    path: str,
    arch: ArchConfig,
    *,
    match: str,
    file: str | None,
    key: str | None = None,
    name: str = "bad",
) -> AdapterError:
    """load_adapter raises exactly `error`, and its attributes and message name where."""
    with pytest.raises(error, match=match) as info:
        load_adapter(name, path, arch)
    err = info.value
    assert type(err) is error, f"{type(err).__name__}: {err}"
    assert err.adapter == name and f"adapter '{name}'" in str(err)
    assert err.file == file
    if file is not None:
        assert file in str(err)
    assert err.key == key
    if key is not None:
        assert f"key '{key}'" in str(err)
    assert err.problem in str(err)
    return err
