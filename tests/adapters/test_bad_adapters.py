"""Every kind of bad adapter raises its documented typed error, naming the adapter, the file and
the key; and a bad adapter never disturbs the adapters already loaded."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from support.adapter_files import BaseDims, save_weights, write_adapter
from support.harness import SeqSpec, make_runner, run_sequences
from support.tiny_models import tiny_config

from mixserve.adapters import (
    AdapterCapacityError,
    AdapterConfigError,
    AdapterError,
    AdapterFileError,
    AdapterNotFoundError,
    AdapterPool,
    AdapterShapeError,
    AdapterValueError,
    BaseModelMismatchError,
    MissingTensorError,
    PoolShape,
    UnexpectedTensorError,
    UnknownRoutingStrategyError,
    UnsupportedAdapterError,
    load_adapter,
)
from mixserve.model import ArchConfig, load_arch, load_model

DIMS = BaseDims.of(tiny_config("llama"))
CONFIG = "adapter_config.json"
BIN = "adapter_model.bin"
SAFETENSORS = "adapter_model.safetensors"
_DROP = object()  # _edit_config: remove the key


class NotATensor:
    """A custom class: weights_only unpickling must refuse it."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


@pytest.fixture(scope="module")
def arch(tiny_llama_dir: str) -> ArchConfig:
    return load_arch(tiny_llama_dir)


def _good(tmp_path: Any, strategy: str | None = "mixlora", **kw: Any) -> str:
    name = kw.pop("name", str(strategy))
    return write_adapter(str(tmp_path / name), DIMS, strategy, **kw)


def _edit_config(path: str, **changes: object) -> str:
    file = os.path.join(path, CONFIG)
    with open(file) as f:
        config = json.load(f)
    for key, value in changes.items():
        if value is _DROP:
            config.pop(key, None)
        else:
            config[key] = value
    with open(file, "w") as f:
        json.dump(config, f)
    return file


def _edit_weights(path: str, edit: Callable[[dict[str, torch.Tensor]], object]) -> str:
    """Apply `edit` to the tensors of an adapter_model.bin in place; returns the file."""
    file = os.path.join(path, BIN)
    weights = torch.load(file, weights_only=True)
    weights = {k: v.detach().clone() for k, v in weights.items()}
    edit(weights)
    torch.save(weights, file)
    return file


def _save_raw(path: str, obj: object) -> str:
    file = os.path.join(path, BIN)
    torch.save(obj, file)
    return file


def _load_fails(
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


# missing files and unreadable config


def test_missing_folder(tmp_path, arch):
    path = str(tmp_path / "nowhere")
    _load_fails(AdapterNotFoundError, path, arch, match="no such adapter folder", file=path)


def test_a_file_is_not_an_adapter_folder(tmp_path, arch):
    path = os.path.join(_good(tmp_path), CONFIG)
    _load_fails(AdapterNotFoundError, path, arch, match="no such adapter folder", file=path)


def test_missing_adapter_config(tmp_path, arch):
    path = _good(tmp_path)
    os.remove(os.path.join(path, CONFIG))
    _load_fails(AdapterNotFoundError, path, arch, match="missing adapter_config.json", file=path)


def test_missing_weights_file(tmp_path, arch):
    path = _good(tmp_path)
    os.remove(os.path.join(path, BIN))
    _load_fails(AdapterNotFoundError, path, arch, match="missing adapter_model", file=path)


def test_invalid_json(tmp_path, arch):
    path = _good(tmp_path)
    file = os.path.join(path, CONFIG)
    with open(file, "w") as f:
        f.write('{"peft_type": "MIXLORA", "r": 8,')
    _load_fails(AdapterConfigError, path, arch, match="invalid JSON", file=file)


def test_config_that_is_not_an_object(tmp_path, arch):
    path = _good(tmp_path)
    file = os.path.join(path, CONFIG)
    with open(file, "w") as f:
        json.dump(["r", 8], f)
    _load_fails(AdapterConfigError, path, arch, match="JSON object", file=file)


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
    path = _good(tmp_path, strategy)
    file = _edit_weights(path, lambda w: w.pop(key))
    _load_fails(
        MissingTensorError,
        path,
        arch,
        match=r"missing \(adapter_config.json implies it\)",
        file=file,
        key=key,
    )


def test_peft_file_without_any_lora_tensor(tmp_path, arch):
    path = _good(tmp_path, None)
    file = _save_raw(path, {"something.else.weight": torch.zeros(2, 2)})
    _load_fails(MissingTensorError, path, arch, match="no LoRA tensors", file=file)


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
    path = _good(tmp_path, strategy)
    file = _edit_weights(path, lambda w: w.__setitem__(key, torch.zeros(4, 64)))
    _load_fails(
        UnexpectedTensorError,
        path,
        arch,
        match="not explained by adapter_config",
        file=file,
        key=key,
    )


@pytest.mark.parametrize("strategy", [None, "mixlora", "mola"])
def test_rank_mismatch_is_a_shape_error_not_a_base_model_mismatch(tmp_path, arch, strategy):
    path = _good(tmp_path, strategy, r=4)
    file = os.path.join(path, BIN)
    _edit_config(path, r=8)
    prefix = {None: "base_model.model.model", "mixlora": "mixlora", "mola": "mola"}[strategy]
    mid = "experts.0." if strategy == "mola" else ""
    key = f"{prefix}.layers.0.self_attn.q_proj.{mid}lora_A.weight"
    err = _load_fails(AdapterShapeError, path, arch, match="rank 4 != 8", file=file, key=key)
    assert "(4, 64)" in str(err) and "(8, 64)" in str(err)


def test_expert_rank_mismatch(tmp_path, arch):
    path = _good(tmp_path, "mixlora", expert_r=16)
    key = "mixlora.layers.0.mlp.gate_proj.experts.0.lora_A.weight"
    file = os.path.join(path, BIN)
    _load_fails(AdapterShapeError, path, arch, match="rank 16 != 8", file=file, key=key)
    # The same file is right once expert_lora says so.
    _edit_config(path, expert_lora={"r": 16, "lora_alpha": 32})
    assert load_adapter("bad", path, arch).sites["gate_proj"].rank == 16


def test_router_with_the_wrong_number_of_experts(tmp_path, arch):
    key = "loramoe.layers.1.mlp.up_proj.moe_gate.weight"
    path = _good(tmp_path, "loramoe")
    file = _edit_weights(path, lambda w: w.__setitem__(key, torch.randn(3, 64)))
    _load_fails(AdapterShapeError, path, arch, match="num_experts 3 != 4", file=file, key=key)


@pytest.mark.parametrize("shape", [(8,), (1, 8, 64)])
def test_tensor_of_the_wrong_rank_of_dimensions(tmp_path, arch, shape: tuple[int, ...]):
    key = "mixlora.layers.0.self_attn.q_proj.lora_A.weight"
    path = _good(tmp_path)
    file = _edit_weights(path, lambda w: w.__setitem__(key, torch.randn(*shape)))
    _load_fails(AdapterShapeError, path, arch, match="expected \\(8, 64\\)", file=file, key=key)


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
    err = _load_fails(
        BaseModelMismatchError, path, arch, match="hidden size 32 != 64", file=file, key=key
    )
    assert "base model" in err.problem


def test_adapter_for_another_intermediate_size(tmp_path, arch):
    other = BaseDims.of(tiny_config("llama", intermediate_size=96))
    path = write_adapter(str(tmp_path / "i96"), other, "mola", targets=("down_proj",))
    key = "mola.layers.0.mlp.down_proj.moe_gate.weight"
    file = os.path.join(path, BIN)
    _load_fails(
        BaseModelMismatchError, path, arch, match="intermediate size 96 != 128", file=file, key=key
    )


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("strategy", [None, "mixlora", "dynmole"])
def test_adapter_for_another_number_of_layers(tmp_path, arch, layers: int, strategy):
    other = BaseDims.of(tiny_config("llama", num_hidden_layers=layers))
    path = write_adapter(str(tmp_path / f"l{layers}"), other, strategy)
    file = os.path.join(path, BIN)
    match = f"adapter has {layers} layers, the base model has 2"
    _load_fails(BaseModelMismatchError, path, arch, match=match, file=file)


def test_layers_to_transform_beyond_the_base_model(tmp_path, arch):
    path = _good(tmp_path, None)
    _edit_config(path, layers_to_transform=[0, 5])
    file = os.path.join(path, BIN)
    _load_fails(BaseModelMismatchError, path, arch, match="layer 5", file=file)


# config values


def test_unknown_routing_strategy(tmp_path, arch):
    path = _good(tmp_path)
    file = _edit_config(path, routing_strategy="mixlora-topk")
    _load_fails(
        UnknownRoutingStrategyError,
        path,
        arch,
        match="'mixlora-topk'",
        file=file,
        key="routing_strategy",
    )


@pytest.mark.parametrize("value", [["mixlora"], {"name": "mixlora"}, 3])
def test_routing_strategy_of_the_wrong_type(tmp_path, arch, value: object):
    path = _good(tmp_path)
    file = _edit_config(path, routing_strategy=value)
    _load_fails(
        UnknownRoutingStrategyError,
        path,
        arch,
        match="routing_strategy",
        file=file,
        key="routing_strategy",
    )


@pytest.mark.parametrize("peft_type", ["ADALORA", "IA3", "lora"])
def test_unsupported_peft_type(tmp_path, arch, peft_type: str):
    path = _good(tmp_path, None)
    file = _edit_config(path, peft_type=peft_type)
    _load_fails(UnsupportedAdapterError, path, arch, match=peft_type, file=file, key="peft_type")


@pytest.mark.parametrize("value", [["MIXLORA"], {"type": "LORA"}])
def test_peft_type_of_the_wrong_type(tmp_path, arch, value: object):
    path = _good(tmp_path)
    file = _edit_config(path, peft_type=value)
    # Either typed error is fine; a bare TypeError is not.
    with pytest.raises((AdapterConfigError, UnsupportedAdapterError)) as info:
        load_adapter("bad", path, arch)
    assert info.value.file == file and info.value.key == "peft_type"


def test_seq_cls_task(tmp_path, arch):
    path = _good(tmp_path)
    file = _edit_config(path, task_type="SEQ_CLS")
    _load_fails(UnsupportedAdapterError, path, arch, match="SEQ_CLS", file=file, key="task_type")


def test_question_answering_task_is_served(tmp_path, arch):
    path = _good(tmp_path)
    _edit_config(path, task_type="QUESTION_ANS")
    assert load_adapter("qa", path, arch).spec.num_experts == 4


@pytest.mark.parametrize("foreign", ["qkv_proj", "gate_up_proj", "dense_h_to_4h"])
def test_targets_of_another_model_family(tmp_path, arch, foreign: str):
    path = _good(tmp_path)
    file = _edit_config(path, target_modules=["q_proj", foreign, "gate_proj"])
    _load_fails(
        UnsupportedAdapterError, path, arch, match=f"'{foreign}'", file=file, key="target_modules"
    )


@pytest.mark.parametrize("strategy", ["mixlora", "mola"])
def test_top_k_above_num_experts(tmp_path, arch, strategy: str):
    path = _good(tmp_path, strategy)
    file = _edit_config(path, top_k=5)
    _load_fails(
        AdapterConfigError, path, arch, match="5 exceeds num_experts 4", file=file, key="top_k"
    )


_BAD_VALUES = [
    ("mixlora-dynamic", "top_p", 0),
    ("mixlora-dynamic", "top_p", 1.5),
    ("mixlora-dynamic", "top_p", "0.8"),
    ("mixlora-dynamic", "temperature", -0.1),
    ("dynmole", "top_p", 0.0),
    ("dynmole", "top_p", 1.01),
    ("dynmole", "entropy_index", 2.5),
    ("dynmole", "entropy_index", 0),
    ("dynmole", "entropy_threshold", 0),
    ("dynmole", "entropy_eps", -1e-5),
    ("dynmole", "keep_top_k", 0),
    ("dynmole", "entropy_type", "shannon"),
    ("mixlora", "r", -8),
    ("mixlora", "r", 0),
    ("mixlora", "r", 8.5),
    ("mixlora", "r", 8.0),
    ("mixlora", "r", "8"),
    ("mixlora", "r", True),
    (None, "r", 0),
    (None, "lora_alpha", 0),
    (None, "lora_alpha", -16),
    (None, "lora_alpha", "16"),
    ("mixlora", "num_experts", 0),
    ("mixlora", "num_experts", 4.0),
    ("mixlora", "top_k", 0),
    ("mixlora", "act_fn", "no_such_activation"),
    ("mixlora", "use_rslora", "yes"),
    (None, "use_dora", 1),
]


@pytest.mark.parametrize(("strategy", "key", "value"), _BAD_VALUES)
def test_bad_numeric_and_typed_values(tmp_path, arch, strategy: str | None, key: str, value):
    path = _good(tmp_path, strategy)
    file = _edit_config(path, **{key: value})
    err = _load_fails(AdapterConfigError, path, arch, match="must|unknown", file=file, key=key)
    assert repr(value) in err.problem or str(value) in err.problem


def test_missing_required_values(tmp_path, arch):
    for key in ("r", "lora_alpha", "num_experts"):
        path = _good(tmp_path, "mola", name=f"no-{key}")
        file = _edit_config(path, **{key: _DROP})
        _load_fails(AdapterConfigError, path, arch, match="required", file=file, key=key)


# Python's json reads the NaN / Infinity literals; MoE-PEFT configs never hold them, so a server
# must not turn them into NaN scales or routing thresholds.
_NON_FINITE = [
    (None, "lora_alpha", float("nan")),
    (None, "lora_alpha", float("inf")),
    ("mixlora-dynamic", "top_p", float("nan")),
    ("mixlora-dynamic", "temperature", float("nan")),
    ("mixlora-dynamic", "temperature", float("inf")),
    ("dynmole", "entropy_threshold", float("nan")),
    ("dynmole", "entropy_index", float("nan")),
    ("dynmole", "entropy_eps", float("inf")),
]


@pytest.mark.parametrize(("strategy", "key", "value"), _NON_FINITE)
def test_non_finite_config_numbers(tmp_path, arch, strategy: str | None, key: str, value: float):
    path = _good(tmp_path, strategy)
    file = _edit_config(path, **{key: value})
    with pytest.raises(AdapterConfigError) as info:
        load_adapter("bad", path, arch)
    assert info.value.file == file and info.value.key == key


# unreadable or non-tensor weight files


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_weights_file(tmp_path, arch, fmt: str, keep: float):
    path = _good(tmp_path, "dynmole", fmt=fmt)
    file = os.path.join(path, BIN if fmt == "bin" else SAFETENSORS)
    with open(file, "rb") as f:
        data = f.read()
    with open(file, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    _load_fails(AdapterFileError, path, arch, match="truncated or corrupt", file=file)


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensor_values(tmp_path, arch, fmt: str, bad: float):
    key = "mixlora.layers.1.mlp.down_proj.experts.3.lora_B.weight"
    path = _good(tmp_path)
    file = _edit_weights(path, lambda w: w[key].view(-1).__setitem__(7, bad))
    if fmt == "safetensors":
        weights = torch.load(file, weights_only=True)
        os.remove(file)
        file = save_weights(path, weights, "safetensors")
    _load_fails(AdapterValueError, path, arch, match="NaN or Inf", file=file, key=key)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_dtype_tensor(tmp_path, arch, dtype: torch.dtype):
    key = "mixlora.layers.0.self_attn.v_proj.lora_B.weight"
    path = _good(tmp_path)
    file = _edit_weights(path, lambda w: w.__setitem__(key, torch.ones(32, 8, dtype=dtype)))
    _load_fails(AdapterValueError, path, arch, match="not a float dtype", file=file, key=key)


def test_half_precision_tensors_are_accepted(tmp_path, arch):
    path = _good(tmp_path)
    _edit_weights(path, lambda w: w.update({k: v.to(torch.bfloat16) for k, v in w.items()}))
    loaded = load_adapter("bf16", path, arch)
    assert loaded.sites["q_proj"].lora_a.dtype == torch.float32


def test_pickled_custom_object_is_refused(tmp_path, arch):
    path = _good(tmp_path)
    weights = torch.load(os.path.join(path, BIN), weights_only=True)
    file = _save_raw(path, {**weights, "mixlora.layers.0.mlp.moe_gate.weight": NotATensor()})
    err = _load_fails(AdapterFileError, path, arch, match="refused to unpickle", file=file)
    # The message should say what was refused, not only torch's generic advice.
    assert "NotATensor" in str(err)
    assert "\x1b[" not in str(err)


def test_list_value_instead_of_a_tensor(tmp_path, arch):
    key = "mixlora.layers.0.mlp.moe_gate.weight"
    path = _good(tmp_path)
    weights = torch.load(os.path.join(path, BIN), weights_only=True)
    file = _save_raw(path, {**weights, key: [[0.0] * 64] * 4})
    _load_fails(AdapterValueError, path, arch, match="is a list, not a tensor", file=file, key=key)


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([torch.zeros(2, 2)], "holds a list, not a dict"),
        (torch.zeros(2, 2), "holds a Tensor, not a dict"),
        ({3: torch.zeros(2, 2)}, "non-string key 3"),
    ],
)
def test_weights_file_that_is_not_a_dict_of_named_tensors(tmp_path, arch, obj: object, match: str):
    path = _good(tmp_path)
    file = _save_raw(path, obj)
    _load_fails(AdapterFileError, path, arch, match=match, file=file)


# valid adapters of kinds mixserve does not serve


@pytest.mark.parametrize("leaf", ["lora_magnitude_vector", "lora_magnitude_vector.weight"])
def test_peft_dora_magnitude_vectors_are_unsupported(tmp_path, arch, leaf: str):
    path = _good(tmp_path, None)
    key = f"base_model.model.model.layers.0.self_attn.q_proj.{leaf}"
    _edit_config(path, use_dora=True)
    file = _edit_weights(path, lambda w: w.__setitem__(key, torch.ones(64)))
    _load_fails(UnsupportedAdapterError, path, arch, match="DoRA", file=file, key=key)


def test_lora_bias_tensors_are_unsupported(tmp_path, arch):
    path = _good(tmp_path, None)
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.bias"
    file = _edit_weights(path, lambda w: w.__setitem__(key, torch.zeros(128)))
    _load_fails(UnsupportedAdapterError, path, arch, match="bias", file=file, key=key)


def test_moe_peft_dora_without_magnitudes_loads_as_lora_with_a_warning(tmp_path, arch, caplog):
    path = _good(tmp_path, "mixlora")
    _edit_config(path, use_dora=True)
    loaded = load_adapter("dora", path, arch)
    assert loaded.spec.dora_without_magnitude
    assert "reloads as plain LoRA" in caplog.text


# a bad adapter never disturbs the adapters already loaded

SEQS = [SeqSpec(list(range(3, 17)), "good"), SeqSpec(list(range(30, 39)))]


def _pool_state(pool: AdapterPool) -> dict[str, Any]:
    state: dict[str, Any] = {"names": list(pool.names), "acts": list(pool.activations)}
    for proj, stack in pool.stacks.sites.items():
        state[f"{proj}.a"] = stack.lora_a.clone()
        state[f"{proj}.b"] = stack.lora_b.clone()
        state[f"{proj}.scale"] = stack.scale.clone()
        state[f"{proj}.router"] = None if stack.router is None else stack.router.clone()
        state[f"{proj}.kind"] = pool.site_kinds[proj].clone()
    state["ffn_router"] = pool.stacks.ffn_router.clone()  # type: ignore[union-attr]
    state["ffn_slots"] = pool.ffn_slots.clone()
    for field in type(pool.routing).__dataclass_fields__:
        state[f"routing.{field}"] = getattr(pool.routing, field).clone()
    return state


def _assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


@pytest.fixture()
def loaded_pool(tmp_path, tiny_llama_dir, arch):
    """A 2-slot pool with a good DynMoLE adapter in slot 0, and its engine logits."""
    model = load_model(tiny_llama_dir)
    good = load_adapter("good", _good(tmp_path, "dynmole", name="good", seed=11), arch)
    shape = PoolShape(8, 4, 4, attn_routers=True, mlp_routers=True, ffn_router=True)
    pool = AdapterPool(arch, shape, 2, torch.float32, "cpu")
    pool.load(0, good)
    logits = run_sequences(make_runner(model, pool), SEQS, {"good": 0}, chunk_sizes=[9, 5])
    base = run_sequences(make_runner(model), [SeqSpec(SEQS[0].token_ids)])[0]
    assert not torch.allclose(logits[0], base)  # the adapter does something
    return model, pool, logits


def test_failed_validation_leaves_loaded_adapters_bit_identical(tmp_path, arch, loaded_pool):
    model, pool, logits = loaded_pool
    before = _pool_state(pool)
    nan_dir = _good(tmp_path, "dynmole", name="nan")
    _edit_weights(
        nan_dir, lambda w: w["dynmole.layers.0.mlp.up_proj.moe_gate.weight"].fill_(torch.inf)
    )
    missing_dir = _good(tmp_path, "mixlora", name="missing")
    _edit_weights(missing_dir, lambda w: w.pop("mixlora.layers.1.mlp.moe_gate.weight"))
    json_dir = _good(tmp_path, "mola", name="json")
    with open(os.path.join(json_dir, CONFIG), "w") as f:
        f.write("{")
    for bad in (nan_dir, missing_dir, json_dir, str(tmp_path / "absent")):
        with pytest.raises(AdapterError):
            load_adapter("good", bad, arch)  # even under the loaded adapter's own name
    _assert_same_state(before, _pool_state(pool))
    after = run_sequences(make_runner(model, pool), SEQS, {"good": 0}, chunk_sizes=[9, 5])
    for got, want in zip(after, logits, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("strategy", "kw", "match"),
    [
        ("dynmole", {"r": 16}, "rank 16 exceeds the pool's max rank 8"),
        ("mixlora", {"num_experts": 6}, "6 experts exceed the pool's 4"),
        ("mola", {"num_experts": 8, "targets": ("k_proj",)}, "8 experts exceed the pool's 4"),
    ],
)
def test_adapter_too_big_for_the_pool_leaves_every_slot_untouched(
    tmp_path, arch, loaded_pool, strategy: str, kw: dict[str, Any], match: str
):
    model, pool, logits = loaded_pool
    big = load_adapter("big", _good(tmp_path, strategy, name="big", seed=5, **kw), arch)
    before = _pool_state(pool)
    for slot in (0, 1):
        with pytest.raises(AdapterCapacityError, match=match) as info:
            pool.load(slot, big)
        assert info.value.adapter == "big" and "adapter 'big'" in str(info.value)
    _assert_same_state(before, _pool_state(pool))
    after = run_sequences(make_runner(model, pool), SEQS, {"good": 0}, chunk_sizes=[9, 5])
    for got, want in zip(after, logits, strict=True):
        assert torch.equal(got, want)


def _save_config(path: Any, **overrides: object) -> str:
    os.makedirs(path, exist_ok=True)
    tiny_config("llama", **overrides).save_pretrained(str(path))
    return str(path)


def test_adapter_validated_for_another_base_model_is_refused_before_the_slot_is_touched(
    tmp_path, loaded_pool
):
    # An AdapterWeights validated against a 3-layer base fits the pool's rank and experts but not
    # its layers: the pool must refuse it with a typed error before clearing the slot.
    model, pool, logits = loaded_pool
    dims3 = BaseDims.of(tiny_config("llama", num_hidden_layers=3))
    arch3 = load_arch(_save_config(tmp_path / "base3", num_hidden_layers=3))
    other = load_adapter("other", write_adapter(str(tmp_path / "other"), dims3, "dynmole"), arch3)
    before = _pool_state(pool)
    with pytest.raises(AdapterError):
        pool.load(0, other)
    _assert_same_state(before, _pool_state(pool))
    after = run_sequences(make_runner(model, pool), SEQS, {"good": 0}, chunk_sizes=[9, 5])
    assert torch.equal(after[0], logits[0])
