"""Bad adapter tensors raise their documented typed errors, naming the adapter, the file and the
key: missing or unexpected tensors, wrong shapes, adapters for another base model, NaN/Inf or
integer values, and tensors of adapter kinds mixserve does not serve."""

from __future__ import annotations

import os

import pytest
import torch
from support.adapter_files import BaseDims, save_weights, write_adapter
from support.bad_adapters import (
    BIN,
    edit_config,
    edit_weights,
    good_adapter,
    load_fails,
    save_raw,
)
from support.tiny_models import tiny_config

from mixserve.adapters import (
    AdapterShapeError,
    AdapterValueError,
    BaseModelMismatchError,
    MissingTensorError,
    UnexpectedTensorError,
    UnsupportedAdapterError,
    load_adapter,
)

# tensors missing, unexpected or of the wrong shape


@pytest.mark.parametrize(
    ("strategy", "key"),
    [
        ("mixlora", "mixlora.layers.1.mlp.up_proj.experts.2.lora_B.weight"),
        ("mixlora", "mixlora.layers.0.mlp.moe_gate.weight"),  # the one MoE-PEFT reads with []
        ("mixlora", "mixlora.layers.1.self_attn.o_proj.lora_A.weight"),
        ("loramoe", "loramoe.layers.0.mlp.down_proj.moe_gate.weight"),
        ("mola", "mola.layers.1.self_attn.k_proj.moe_gate.weight"),
        ("dynmole", "dynmole.layers.1.mlp.gate_proj.experts.3.lora_A.weight"),
        (None, "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"),
    ],
    ids=[
        "expert-lora_B",
        "mixlora-router",
        "attn-lora_A",
        "loramoe-gate",
        "mola-gate",
        "dynmole",
        "peft-lora",
    ],
)
def test_missing_tensor(tmp_path, arch, strategy: str | None, key: str):
    path = good_adapter(tmp_path, strategy)
    file = edit_weights(path, lambda w: w.pop(key))
    load_fails(
        MissingTensorError,
        path,
        arch,
        match=r"missing \(adapter_config.json implies it\)",
        file=file,
        key=key,
    )


def test_peft_file_without_any_lora_tensor(tmp_path, arch):
    path = good_adapter(tmp_path, None)
    file = save_raw(path, {"something.else.weight": torch.zeros(2, 2)})
    load_fails(MissingTensorError, path, arch, match="no LoRA tensors", file=file)


@pytest.mark.parametrize(
    ("strategy", "key"),
    [
        ("mixlora", "mixlora.layers.0.mlp.gate_proj.experts.4.lora_A.weight"),
        ("mixlora", "mixlora.layers.0.self_attn.q_proj.moe_gate.weight"),
        ("dynmole", "dynmole.layers.1.self_attn.q_proj.lora_A.weight"),
        (None, "classifier"),
    ],
)
def test_unexpected_tensor(tmp_path, arch, strategy: str | None, key: str):
    path = good_adapter(tmp_path, strategy)
    file = edit_weights(path, lambda w: w.__setitem__(key, torch.zeros(4, 64)))
    load_fails(
        UnexpectedTensorError,
        path,
        arch,
        match="not explained by adapter_config",
        file=file,
        key=key,
    )


@pytest.mark.parametrize("strategy", [None, "mixlora", "mola"])
def test_rank_mismatch_is_a_shape_error_not_a_base_model_mismatch(tmp_path, arch, strategy):
    path = good_adapter(tmp_path, strategy, r=4)
    file = os.path.join(path, BIN)
    edit_config(path, r=8)
    prefix = {None: "base_model.model.model", "mixlora": "mixlora", "mola": "mola"}[strategy]
    mid = "experts.0." if strategy == "mola" else ""
    key = f"{prefix}.layers.0.self_attn.q_proj.{mid}lora_A.weight"
    err = load_fails(AdapterShapeError, path, arch, match="rank 4 != 8", file=file, key=key)
    assert "(4, 64)" in str(err) and "(8, 64)" in str(err)


def test_expert_rank_mismatch(tmp_path, arch):
    path = good_adapter(tmp_path, "mixlora", expert_r=16)
    key = "mixlora.layers.0.mlp.gate_proj.experts.0.lora_A.weight"
    file = os.path.join(path, BIN)
    load_fails(AdapterShapeError, path, arch, match="rank 16 != 8", file=file, key=key)
    # The same file is right once expert_lora says so.
    edit_config(path, expert_lora={"r": 16, "lora_alpha": 32})
    assert load_adapter("bad", path, arch).sites["gate_proj"].rank == 16


def test_router_with_the_wrong_number_of_experts(tmp_path, arch):
    key = "loramoe.layers.1.mlp.up_proj.moe_gate.weight"
    path = good_adapter(tmp_path, "loramoe")
    file = edit_weights(path, lambda w: w.__setitem__(key, torch.randn(3, 64)))
    load_fails(AdapterShapeError, path, arch, match="num_experts 3 != 4", file=file, key=key)


@pytest.mark.parametrize("shape", [(8,), (1, 8, 64)])
def test_tensor_of_the_wrong_rank_of_dimensions(tmp_path, arch, shape: tuple[int, ...]):
    key = "mixlora.layers.0.self_attn.q_proj.lora_A.weight"
    path = good_adapter(tmp_path)
    file = edit_weights(path, lambda w: w.__setitem__(key, torch.randn(*shape)))
    load_fails(AdapterShapeError, path, arch, match="expected \\(8, 64\\)", file=file, key=key)


@pytest.mark.parametrize("strategy", [None, "mixlora", "loramoe", "dynmole"])
def test_adapter_for_another_hidden_size(tmp_path, arch, strategy: str | None):
    other = BaseDims.of(tiny_config("llama", hidden_size=32))
    path = write_adapter(str(tmp_path / "h32"), other, strategy)
    file = os.path.join(path, BIN)
    key = {
        None: "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "mixlora": "mixlora.layers.0.mlp.moe_gate.weight",
        "loramoe": "loramoe.layers.0.self_attn.q_proj.lora_A.weight",
        "dynmole": "dynmole.layers.0.self_attn.q_proj.moe_gate.weight",
    }[strategy]
    err = load_fails(
        BaseModelMismatchError, path, arch, match="hidden size 32 != 64", file=file, key=key
    )
    assert "base model" in err.problem


def test_adapter_for_another_intermediate_size(tmp_path, arch):
    other = BaseDims.of(tiny_config("llama", intermediate_size=96))
    path = write_adapter(str(tmp_path / "i96"), other, "mola", targets=("down_proj",))
    key = "mola.layers.0.mlp.down_proj.moe_gate.weight"
    file = os.path.join(path, BIN)
    load_fails(
        BaseModelMismatchError, path, arch, match="intermediate size 96 != 128", file=file, key=key
    )


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("strategy", [None, "mixlora", "dynmole"])
def test_adapter_for_another_number_of_layers(tmp_path, arch, layers: int, strategy):
    other = BaseDims.of(tiny_config("llama", num_hidden_layers=layers))
    path = write_adapter(str(tmp_path / f"l{layers}"), other, strategy)
    file = os.path.join(path, BIN)
    match = f"adapter has {layers} layers, the base model has 2"
    load_fails(BaseModelMismatchError, path, arch, match=match, file=file)


def test_layers_to_transform_beyond_the_base_model(tmp_path, arch):
    path = good_adapter(tmp_path, None)
    edit_config(path, layers_to_transform=[0, 5])
    file = os.path.join(path, BIN)
    load_fails(BaseModelMismatchError, path, arch, match="layer 5", file=file)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensor_values(tmp_path, arch, fmt: str, bad: float):
    key = "mixlora.layers.1.mlp.down_proj.experts.3.lora_B.weight"
    path = good_adapter(tmp_path)
    file = edit_weights(path, lambda w: w[key].view(-1).__setitem__(7, bad))
    if fmt == "safetensors":
        weights = torch.load(file, weights_only=True)
        os.remove(file)
        file = save_weights(path, weights, "safetensors")
    load_fails(AdapterValueError, path, arch, match="NaN or Inf", file=file, key=key)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_dtype_tensor(tmp_path, arch, dtype: torch.dtype):
    key = "mixlora.layers.0.self_attn.v_proj.lora_B.weight"
    path = good_adapter(tmp_path)
    file = edit_weights(path, lambda w: w.__setitem__(key, torch.ones(32, 8, dtype=dtype)))
    load_fails(AdapterValueError, path, arch, match="not a float dtype", file=file, key=key)


def test_half_precision_tensors_are_accepted(tmp_path, arch):
    path = good_adapter(tmp_path)
    edit_weights(path, lambda w: w.update({k: v.to(torch.bfloat16) for k, v in w.items()}))
    loaded = load_adapter("bf16", path, arch)
    assert loaded.sites["q_proj"].lora_a.dtype == torch.float32


# valid adapters of kinds mixserve does not serve


@pytest.mark.parametrize("leaf", ["lora_magnitude_vector", "lora_magnitude_vector.weight"])
def test_peft_dora_magnitude_vectors_are_unsupported(tmp_path, arch, leaf: str):
    path = good_adapter(tmp_path, None)
    key = f"base_model.model.model.layers.0.self_attn.q_proj.{leaf}"
    edit_config(path, use_dora=True)
    file = edit_weights(path, lambda w: w.__setitem__(key, torch.ones(64)))
    load_fails(UnsupportedAdapterError, path, arch, match="DoRA", file=file, key=key)


def test_lora_bias_tensors_are_unsupported(tmp_path, arch):
    path = good_adapter(tmp_path, None)
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.bias"
    file = edit_weights(path, lambda w: w.__setitem__(key, torch.zeros(128)))
    load_fails(UnsupportedAdapterError, path, arch, match="bias", file=file, key=key)


def test_moe_peft_dora_without_magnitudes_loads_as_lora_with_a_warning(tmp_path, arch, caplog):
    path = good_adapter(tmp_path, "mixlora")
    edit_config(path, use_dora=True)
    loaded = load_adapter("dora", path, arch)
    assert loaded.spec.dora_without_magnitude
    assert "reloads as plain LoRA" in caplog.text


@pytest.mark.parametrize(
    ("strategy", "key"),
    [
        ("mixlora", "mixlora.layers.0.mlp.moe_gate.weight"),  # the FFN router
        ("mixlora", "mixlora.layers.1.self_attn.q_proj.lora_A.weight"),
        ("loramoe", "loramoe.layers.1.mlp.down_proj.moe_gate.weight"),  # a site router
        (None, "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"),
    ],
    ids=["ffn-router", "attn-lora_A", "site-router", "peft-lora_B"],
)
def test_a_non_finite_value_anywhere_is_found_and_named(tmp_path, arch, strategy, key):
    path = good_adapter(tmp_path, strategy)
    file = edit_weights(path, lambda w: w[key].view(-1).__setitem__(-1, float("inf")))
    load_fails(AdapterValueError, path, arch, match="NaN or Inf", file=file, key=key)


def test_huge_finite_values_are_not_mistaken_for_inf(tmp_path, arch):
    """The finiteness check sums stacked tensors first; a sum that overflows on finite values
    must fall through to the exact check and load."""
    key = "mixlora.layers.1.mlp.down_proj.experts.3.lora_B.weight"
    path = good_adapter(tmp_path)
    edit_weights(path, lambda w: w[key].view(-1)[:4].fill_(3e38))
    weights = load_adapter("x", path, arch)
    assert torch.isinf(weights.sites["down_proj"].lora_b.sum())  # the fast path did overflow
