"""Bad adapter_config.json values raise their documented typed errors, naming the adapter, the
file and the key: routing strategies, PEFT types and tasks, targets, out-of-range, mistyped,
missing and non-finite values."""

from __future__ import annotations

import pytest
from support.bad_adapters import DROP, edit_config, good_adapter, load_fails

from mixserve.adapters import (
    AdapterConfigError,
    UnknownRoutingStrategyError,
    UnsupportedAdapterError,
    load_adapter,
)

# config values


def test_unknown_routing_strategy(tmp_path, arch):
    path = good_adapter(tmp_path)
    file = edit_config(path, routing_strategy="mixlora-topk")
    load_fails(
        UnknownRoutingStrategyError,
        path,
        arch,
        match="'mixlora-topk'",
        file=file,
        key="routing_strategy",
    )


@pytest.mark.parametrize("value", [["mixlora"], {"name": "mixlora"}, 3])
def test_routing_strategy_of_the_wrong_type(tmp_path, arch, value: object):
    path = good_adapter(tmp_path)
    file = edit_config(path, routing_strategy=value)
    load_fails(
        UnknownRoutingStrategyError,
        path,
        arch,
        match="routing_strategy",
        file=file,
        key="routing_strategy",
    )


@pytest.mark.parametrize("peft_type", ["ADALORA", "IA3", "lora"])
def test_unsupported_peft_type(tmp_path, arch, peft_type: str):
    path = good_adapter(tmp_path, None)
    file = edit_config(path, peft_type=peft_type)
    load_fails(UnsupportedAdapterError, path, arch, match=peft_type, file=file, key="peft_type")


@pytest.mark.parametrize("value", [["MIXLORA"], {"type": "LORA"}])
def test_peft_type_of_the_wrong_type(tmp_path, arch, value: object):
    path = good_adapter(tmp_path)
    file = edit_config(path, peft_type=value)
    # Either typed error is fine; a bare TypeError is not.
    with pytest.raises((AdapterConfigError, UnsupportedAdapterError)) as info:
        load_adapter("bad", path, arch)
    assert info.value.file == file and info.value.key == "peft_type"


def test_seq_cls_task(tmp_path, arch):
    path = good_adapter(tmp_path)
    file = edit_config(path, task_type="SEQ_CLS")
    load_fails(UnsupportedAdapterError, path, arch, match="SEQ_CLS", file=file, key="task_type")


def test_question_answering_task_is_served(tmp_path, arch):
    path = good_adapter(tmp_path)
    edit_config(path, task_type="QUESTION_ANS")
    assert load_adapter("qa", path, arch).spec.num_experts == 4


@pytest.mark.parametrize("foreign", ["qkv_proj", "gate_up_proj", "dense_h_to_4h"])
def test_targets_of_another_model_family(tmp_path, arch, foreign: str):
    path = good_adapter(tmp_path)
    file = edit_config(path, target_modules=["q_proj", foreign, "gate_proj"])
    load_fails(
        UnsupportedAdapterError, path, arch, match=f"'{foreign}'", file=file, key="target_modules"
    )


@pytest.mark.parametrize("strategy", ["mixlora", "mola"])
def test_top_k_above_num_experts(tmp_path, arch, strategy: str):
    path = good_adapter(tmp_path, strategy)
    file = edit_config(path, top_k=5)
    load_fails(
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
    path = good_adapter(tmp_path, strategy)
    file = edit_config(path, **{key: value})
    err = load_fails(AdapterConfigError, path, arch, match="must|unknown", file=file, key=key)
    assert repr(value) in err.problem or str(value) in err.problem


def test_missing_required_values(tmp_path, arch):
    for key in ("r", "lora_alpha", "num_experts"):
        path = good_adapter(tmp_path, "mola", name=f"no-{key}")
        file = edit_config(path, **{key: DROP})
        load_fails(AdapterConfigError, path, arch, match="required", file=file, key=key)


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
    path = good_adapter(tmp_path, strategy)
    file = edit_config(path, **{key: value})
    with pytest.raises(AdapterConfigError) as info:
        load_adapter("bad", path, arch)
    assert info.value.file == file and info.value.key == key
