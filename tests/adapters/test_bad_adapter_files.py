"""Bad adapter files raise their documented typed errors, naming the adapter, the file and the
key: missing folders and files, unreadable configs, truncated, corrupt or non-tensor weight
files, pickled objects."""

from __future__ import annotations

import json
import os

import pytest
import torch
from support.bad_adapters import BIN, CONFIG, SAFETENSORS, good_adapter, load_fails, save_raw

from mixserve.adapters import (
    AdapterConfigError,
    AdapterFileError,
    AdapterNotFoundError,
    AdapterValueError,
    load_adapter,
)


class NotATensor:
    """A custom class: weights_only unpickling must refuse it."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


# missing files and unreadable config


def test_missing_folder(tmp_path, arch):
    path = str(tmp_path / "nowhere")
    load_fails(AdapterNotFoundError, path, arch, match="no such adapter folder", file=path)


def test_a_file_is_not_an_adapter_folder(tmp_path, arch):
    path = os.path.join(good_adapter(tmp_path), CONFIG)
    load_fails(AdapterNotFoundError, path, arch, match="no such adapter folder", file=path)


def test_missing_adapter_config(tmp_path, arch):
    path = good_adapter(tmp_path)
    os.remove(os.path.join(path, CONFIG))
    load_fails(AdapterNotFoundError, path, arch, match="missing adapter_config.json", file=path)


def test_missing_weights_file(tmp_path, arch):
    path = good_adapter(tmp_path)
    os.remove(os.path.join(path, BIN))
    load_fails(AdapterNotFoundError, path, arch, match="missing adapter_model", file=path)


def test_invalid_json(tmp_path, arch):
    path = good_adapter(tmp_path)
    file = os.path.join(path, CONFIG)
    with open(file, "w") as f:
        f.write('{"peft_type": "MIXLORA", "r": 8,')
    load_fails(AdapterConfigError, path, arch, match="invalid JSON", file=file)


def test_config_that_is_not_an_object(tmp_path, arch):
    path = good_adapter(tmp_path)
    file = os.path.join(path, CONFIG)
    with open(file, "w") as f:
        json.dump(["r", 8], f)
    load_fails(AdapterConfigError, path, arch, match="JSON object", file=file)


# unreadable or non-tensor weight files


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_weights_file(tmp_path, arch, fmt: str, keep: float):
    path = good_adapter(tmp_path, "dynmole", fmt=fmt)
    file = os.path.join(path, BIN if fmt == "bin" else SAFETENSORS)
    with open(file, "rb") as f:
        data = f.read()
    with open(file, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    load_fails(AdapterFileError, path, arch, match="truncated or corrupt", file=file)


def test_pickled_custom_object_is_refused(tmp_path, arch):
    path = good_adapter(tmp_path)
    weights = torch.load(os.path.join(path, BIN), weights_only=True)
    file = save_raw(path, {**weights, "mixlora.layers.0.mlp.moe_gate.weight": NotATensor()})
    err = load_fails(AdapterFileError, path, arch, match="refused to unpickle", file=file)
    # The message should say what was refused, not only torch's generic advice.
    assert "NotATensor" in str(err)
    assert "\x1b[" not in str(err)


def test_list_value_instead_of_a_tensor(tmp_path, arch):
    key = "mixlora.layers.0.mlp.moe_gate.weight"
    path = good_adapter(tmp_path)
    weights = torch.load(os.path.join(path, BIN), weights_only=True)
    file = save_raw(path, {**weights, key: [[0.0] * 64] * 4})
    load_fails(AdapterValueError, path, arch, match="is a list, not a tensor", file=file, key=key)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([torch.zeros(2, 2)], "holds a list, not a dict"),
        (torch.zeros(2, 2), "holds a Tensor, not a dict"),
        ({3: torch.zeros(2, 2)}, "non-string key 3"),
    ],
)
def test_weights_file_that_is_not_a_dict_of_named_tensors(tmp_path, arch, obj: object, match: str):
    path = good_adapter(tmp_path)
    file = save_raw(path, obj)
    load_fails(AdapterFileError, path, arch, match=match, file=file)


def test_legacy_non_zip_torch_save_format_loads_the_same(tmp_path, arch):
    path = good_adapter(tmp_path)
    file = os.path.join(path, BIN)
    want = load_adapter("x", path, arch)
    weights = torch.load(file, weights_only=True)
    torch.save(weights, file, _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    got = load_adapter("x", path, arch)
    for proj, site in want.sites.items():
        assert torch.equal(got.sites[proj].lora_a, site.lora_a)
        assert torch.equal(got.sites[proj].lora_b, site.lora_b)
    assert torch.equal(got.ffn_router, want.ffn_router)
