"""Base model loading: every bad folder raises ModelLoadError / UnsupportedModelError naming the
file and the problem; a sharded folder loads exactly like the single-file one."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.harness import SeqSpec, make_runner, run_sequences

from mixserve.model import ModelLoadError, UnsupportedModelError, load_arch, load_model

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _copy(tiny_llama_dir: str, tmp_path: Any, name: str = "model") -> str:
    return shutil.copytree(tiny_llama_dir, str(tmp_path / name))


def _edit_config(path: str, edit: Callable[[dict[str, Any]], object]) -> str:
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    edit(config)
    with open(file, "w") as f:
        json.dump(config, f)
    return file


def _edit_tensors(path: str, edit: Callable[[dict[str, torch.Tensor]], object]) -> str:
    file = os.path.join(path, WEIGHTS)
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def _fails(
    error: type[ModelLoadError], load: Callable[[], object], *, path: str, match: str
) -> ModelLoadError:
    with pytest.raises(error, match=match) as info:
        load()
    err = info.value
    assert type(err) is error, f"{type(err).__name__}: {err}"
    assert err.path == path
    assert str(err).startswith(f"{path}: ") and err.problem in str(err)
    return err


# the folder and config.json


def test_not_a_folder(tmp_path):
    missing = str(tmp_path / "no_such_model")
    _fails(ModelLoadError, lambda: load_model(missing), path=missing, match="not a directory")
    file = str(tmp_path / "file.txt")
    with open(file, "w") as f:
        f.write("hello")
    _fails(ModelLoadError, lambda: load_model(file), path=file, match="not a directory")
    config = os.path.join(missing, "config.json")
    _fails(ModelLoadError, lambda: load_arch(missing), path=config, match="missing")


def test_missing_config_json(tiny_llama_dir, tmp_path):
    path = _copy(tiny_llama_dir, tmp_path)
    config = os.path.join(path, "config.json")
    os.remove(config)
    for load in (lambda: load_model(path), lambda: load_arch(path)):
        _fails(ModelLoadError, load, path=config, match="not a Hugging Face model folder")


@pytest.mark.parametrize(
    ("text", "match"), [('{"model_type": "llama",', "unreadable JSON"), ("[1, 2]", "JSON object")]
)
def test_invalid_config_json(tiny_llama_dir, tmp_path, text: str, match: str):
    path = _copy(tiny_llama_dir, tmp_path)
    config = os.path.join(path, "config.json")
    with open(config, "w") as f:
        f.write(text)
    _fails(ModelLoadError, lambda: load_model(path), path=config, match=match)


@pytest.mark.parametrize("model_type", ["gpt2", "phi3", None])
def test_unsupported_model_type(tiny_llama_dir, tmp_path, model_type: str | None):
    path = _copy(tiny_llama_dir, tmp_path)
    config = _edit_config(path, lambda c: c.update(model_type=model_type))
    for load in (lambda: load_model(path), lambda: load_arch(path)):
        err = _fails(UnsupportedModelError, load, path=config, match=f"'{model_type}'")
        assert "llama, mistral, qwen2, qwen3" in err.problem


def test_length_dependent_rope_is_unsupported(tiny_llama_dir, tmp_path):
    path = _copy(tiny_llama_dir, tmp_path)
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    config = _edit_config(path, lambda c: c.update(rope_parameters=rope))
    _fails(UnsupportedModelError, lambda: load_model(path), path=config, match="'dynamic'")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.float8_e4m3fn])
def test_unsupported_dtype_request(tiny_llama_dir, dtype: torch.dtype):
    err = _fails(
        ModelLoadError,
        lambda: load_model(tiny_llama_dir, dtype=dtype),
        path=tiny_llama_dir,
        match="is not supported",
    )
    assert str(dtype) in err.problem


# weight files


def test_no_safetensors_file(tiny_llama_dir, tmp_path):
    path = _copy(tiny_llama_dir, tmp_path)
    os.remove(os.path.join(path, WEIGHTS))
    err = _fails(ModelLoadError, lambda: load_model(path), path=path, match="no \\*.safetensors")
    assert "pytorch_model.bin" not in err.problem


def test_only_a_pytorch_bin_suggests_safetensors(tiny_llama_dir, tmp_path):
    path = _copy(tiny_llama_dir, tmp_path)
    file = os.path.join(path, WEIGHTS)
    torch.save(load_file(file), os.path.join(path, "pytorch_model.bin"))
    os.remove(file)
    err = _fails(ModelLoadError, lambda: load_model(path), path=path, match="pytorch_model.bin")
    assert "save the model with safetensors" in err.problem


@pytest.mark.parametrize("keep", [0.5, 0.0, 0.001])
def test_truncated_safetensors(tiny_llama_dir, tmp_path, keep: float):
    path = _copy(tiny_llama_dir, tmp_path)
    file = os.path.join(path, WEIGHTS)
    with open(file, "rb") as f:
        data = f.read()
    with open(file, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    _fails(ModelLoadError, lambda: load_model(path), path=file, match="corrupt or truncated")


@pytest.mark.parametrize(
    "key", ["model.layers.1.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"]
)
def test_missing_tensor(tiny_llama_dir, tmp_path, key: str):
    path = _copy(tiny_llama_dir, tmp_path)
    _edit_tensors(path, lambda t: t.pop(key))
    _fails(ModelLoadError, lambda: load_model(path), path=path, match=f"missing tensor '{key}'")


def test_wrong_tensor_shape(tiny_llama_dir, tmp_path):
    key = "model.layers.1.mlp.down_proj.weight"  # [hidden 64, intermediate 128]
    path = _copy(tiny_llama_dir, tmp_path)
    file = _edit_tensors(path, lambda t: t.__setitem__(key, t[key].T.contiguous()))
    err = _fails(ModelLoadError, lambda: load_model(path), path=file, match=f"'{key}'")
    assert "(128, 64)" in err.problem and "(64, 128)" in err.problem


def test_integer_tensor(tiny_llama_dir, tmp_path):
    key = "model.layers.0.input_layernorm.weight"
    path = _copy(tiny_llama_dir, tmp_path)
    file = _edit_tensors(path, lambda t: t.__setitem__(key, torch.ones(64, dtype=torch.int32)))
    err = _fails(ModelLoadError, lambda: load_model(path), path=file, match=f"'{key}'")
    assert "int32" in err.problem


def test_extra_tensors_are_ignored_with_a_warning(tiny_llama_dir, tmp_path, caplog):
    path = _copy(tiny_llama_dir, tmp_path)
    _edit_tensors(path, lambda t: t.__setitem__("model.rotary_emb.inv_freq", torch.ones(8)))
    model = load_model(path)
    assert model.arch.num_layers == 2
    assert "model.rotary_emb.inv_freq" in caplog.text


# sharded folders


def _shard(tiny_llama_dir: str, tmp_path: Any) -> tuple[str, dict[str, str]]:
    """The tiny model split into two shards plus model.safetensors.index.json."""
    path = str(tmp_path / "sharded")
    os.makedirs(path)
    for name in os.listdir(tiny_llama_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(tiny_llama_dir, name), path)
    tensors = load_file(os.path.join(tiny_llama_dir, WEIGHTS))
    names = sorted(tensors)
    # Split inside a layer so that one layer's tensors come from both shards.
    split = names.index("model.layers.0.mlp.up_proj.weight")
    weight_map = {}
    for shard, part in zip(SHARDS, (names[:split], names[split:]), strict=True):
        save_file({n: tensors[n] for n in part}, os.path.join(path, shard), {"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return path, weight_map


def test_sharded_folder_gives_the_same_logits(tiny_llama_dir, tmp_path):
    path, weight_map = _shard(tiny_llama_dir, tmp_path)
    assert set(weight_map.values()) == set(SHARDS)
    assert not os.path.exists(os.path.join(path, WEIGHTS))
    seqs = [SeqSpec(list(range(3, 20))), SeqSpec([9, 8, 7])]
    single = run_sequences(make_runner(load_model(tiny_llama_dir)), seqs, chunk_sizes=[4, 1])
    sharded = run_sequences(make_runner(load_model(path)), seqs, chunk_sizes=[4, 1])
    # Not bitwise: the same weights at other addresses can take other GEMM code paths (seen on
    # an AMD EPYC: differences of a few ulp). A missing or misplaced tensor is far off.
    for got, want in zip(sharded, single, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sharded_folder_reads_only_the_indexed_files(tiny_llama_dir, tmp_path):
    path, _ = _shard(tiny_llama_dir, tmp_path)
    # A stray file that is not in the index (e.g. an adapter) must not be read.
    with open(os.path.join(path, "stray.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    assert load_model(path).arch.num_layers == 2


def test_shard_listed_in_the_index_but_missing(tiny_llama_dir, tmp_path):
    path, _ = _shard(tiny_llama_dir, tmp_path)
    shard = os.path.join(path, SHARDS[1])
    os.remove(shard)
    _fails(ModelLoadError, lambda: load_model(path), path=shard, match="listed in the shard index")


@pytest.mark.parametrize("text", ["{", '{"metadata": {}}', '{"weight_map": 3}'])
def test_unreadable_shard_index(tiny_llama_dir, tmp_path, text: str):
    path, _ = _shard(tiny_llama_dir, tmp_path)
    index = os.path.join(path, INDEX)
    with open(index, "w") as f:
        f.write(text)
    _fails(ModelLoadError, lambda: load_model(path), path=index, match="unreadable shard index")


def test_truncated_shard_names_the_shard(tiny_llama_dir, tmp_path):
    path, _ = _shard(tiny_llama_dir, tmp_path)
    shard = os.path.join(path, SHARDS[0])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 3)
    _fails(ModelLoadError, lambda: load_model(path), path=shard, match="corrupt or truncated")


def test_tensor_missing_from_every_shard(tiny_llama_dir, tmp_path):
    path, weight_map = _shard(tiny_llama_dir, tmp_path)
    key = "model.layers.1.self_attn.k_proj.weight"
    shard = os.path.join(path, weight_map[key])
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, {"format": "pt"})
    _fails(ModelLoadError, lambda: load_model(path), path=path, match=f"missing tensor '{key}'")
