"""parse_adapter_config: MoE-PEFT's family precedence (peft_type, then routing_strategy, else
plain LoRA), legacy m-LoRA files, and the authors' defaults when keys are missing
(mixlora_spec.md §1.2, §1.5)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from support.config_parsing import FILE, config_for, minimal, parse

from mixserve.adapters import (
    AdapterConfigError,
    AdapterFamily,
    UnknownRoutingStrategyError,
    UnsupportedAdapterError,
)
from mixserve.kernels import RoutingRule

# family precedence: peft_type, then routing_strategy, else plain LoRA


@pytest.mark.parametrize(
    ("raw", "family", "strategy"),
    [
        (minimal(), AdapterFamily.LORA, None),
        (minimal(peft_type="LORA"), AdapterFamily.LORA, None),
        # A known peft_type wins over routing_strategy, as in lora_config_factory.
        (minimal(peft_type="LORA", routing_strategy="mixlora"), AdapterFamily.LORA, None),
        (minimal(routing_strategy="mixlora", num_experts=4), AdapterFamily.MIXLORA, "mixlora"),
        (
            minimal(routing_strategy="mixlora-switch", num_experts=4),
            AdapterFamily.MIXLORA,
            "mixlora-switch",
        ),
        (minimal(routing_strategy="loramoe", num_experts=4), AdapterFamily.LORAMOE, "loramoe"),
        (minimal(routing_strategy="mola", num_experts=4), AdapterFamily.MOLA, "mola"),
        (minimal(routing_strategy="dynmole", num_experts=4), AdapterFamily.DYNMOLE, "dynmole"),
        # The plugin families' peft_type alone implies their one strategy.
        (minimal(peft_type="LORAMOE", num_experts=4), AdapterFamily.LORAMOE, "loramoe"),
        (minimal(peft_type="MOLA", num_experts=4), AdapterFamily.MOLA, "mola"),
        (minimal(peft_type="DYNMOLE", num_experts=4), AdapterFamily.DYNMOLE, "dynmole"),
        (
            minimal(peft_type="MIXLORA", routing_strategy="mixlora-dynamic", num_experts=4),
            AdapterFamily.MIXLORA,
            "mixlora-dynamic",
        ),
        # An unknown peft_type falls through to routing_strategy, as MoE-PEFT does.
        (
            minimal(peft_type="SOMETHING", routing_strategy="mola", num_experts=4),
            AdapterFamily.MOLA,
            "mola",
        ),
    ],
)
def test_family_precedence(raw: dict[str, Any], family: AdapterFamily, strategy: str | None):
    spec = parse(raw)
    assert spec.family is family
    assert spec.routing_strategy == strategy
    assert spec.is_moe is (family is not AdapterFamily.LORA)
    assert not spec.legacy_names


def test_routing_rule_and_key_prefix_per_strategy():
    rules = {
        "mixlora": RoutingRule.TOP_K,
        "mixlora-dynamic": RoutingRule.TOP_P,
        "mixlora-switch": RoutingRule.SWITCH,
        "loramoe": RoutingRule.DENSE,
        "mola": RoutingRule.TOP_K,
        "dynmole": RoutingRule.DYNMOLE,
    }
    prefixes = {"mixlora": "mixlora", "loramoe": "loramoe", "mola": "mola", "dynmole": "dynmole"}
    for strategy, rule in rules.items():
        spec = parse(config_for(strategy))
        assert spec.rule is rule, strategy
        assert spec.key_prefix == prefixes[spec.family.value]
        assert spec.num_experts == 4
    lora = parse(config_for(None))
    assert lora.rule is RoutingRule.NONE
    assert lora.key_prefix == ""  # PEFT prefixes are read off the weight keys


def test_legacy_mixtral_is_mixlora_with_legacy_names():
    raw = minimal(
        routing_strategy="mixtral",
        num_experts=8,
        target_modules=["q_proj", "v_proj", "w1_proj", "w2_proj", "w3_proj"],
    )
    spec = parse(raw)
    assert spec.family is AdapterFamily.MIXLORA
    assert spec.routing_strategy == "mixlora"
    assert spec.rule is RoutingRule.TOP_K
    assert spec.legacy_names
    assert spec.target_modules == ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


def test_legacy_projection_names_mean_nothing_outside_legacy_files(caplog):
    raw = minimal(target_modules=["q_proj", "w1_proj"])
    with caplog.at_level(logging.WARNING):
        spec = parse(raw)
    assert spec.target_modules == ("q_proj",)
    assert "w1_proj" in caplog.text


def test_mixlora_peft_type_without_routing_strategy_is_an_error():
    with pytest.raises(AdapterConfigError, match="required for peft_type MIXLORA") as info:
        parse(minimal(peft_type="MIXLORA", num_experts=4))
    assert info.value.key == "routing_strategy"
    assert info.value.file == FILE
    assert info.value.adapter == "a"


@pytest.mark.parametrize(
    ("peft_type", "strategy"),
    [("MOLA", "mixlora"), ("MIXLORA", "dynmole"), ("DYNMOLE", "loramoe"), ("LORAMOE", "mola")],
)
def test_contradicting_peft_type_and_routing_strategy_is_an_error(peft_type: str, strategy: str):
    raw = minimal(peft_type=peft_type, routing_strategy=strategy, num_experts=4)
    with pytest.raises(AdapterConfigError, match="contradicts") as info:
        parse(raw)
    assert info.value.key == "routing_strategy"
    assert peft_type in str(info.value) and strategy in str(info.value)


def test_unknown_routing_strategy_is_typed():
    with pytest.raises(UnknownRoutingStrategyError, match="'mixlora-topk'") as info:
        parse(minimal(routing_strategy="mixlora-topk", num_experts=4))
    assert info.value.key == "routing_strategy"
    assert isinstance(info.value, AdapterConfigError)


def test_unknown_peft_type_without_routing_strategy_is_unsupported():
    with pytest.raises(UnsupportedAdapterError, match="'ADALORA'") as info:
        parse(minimal(peft_type="ADALORA"))
    assert info.value.key == "peft_type"


def test_config_must_be_a_json_object():
    with pytest.raises(AdapterConfigError, match="JSON object") as info:
        parse([minimal()])
    assert info.value.file == FILE


# the authors' defaults when keys are missing


def test_mixlora_defaults():
    spec = parse(minimal(routing_strategy="mixlora", num_experts=8))
    assert spec.top_k == 2
    assert spec.act_fn is None  # None = the base model's hidden_act, filled in by the pool


def test_mixlora_dynamic_defaults():
    spec = parse(minimal(routing_strategy="mixlora-dynamic", num_experts=8))
    assert spec.top_p == pytest.approx(0.8)
    assert spec.temperature == 0.0


def test_dynmole_defaults():
    spec = parse(minimal(routing_strategy="dynmole", num_experts=6))
    assert spec.entropy_threshold == pytest.approx(0.9)
    assert spec.entropy_index == pytest.approx(1.1)
    assert spec.entropy_renyi is False  # tsallis: files older than 9354b27 lack entropy_type
    assert spec.entropy_eps == pytest.approx(1e-5)
    assert spec.keep_top_k == 2
    assert spec.top_p == pytest.approx(0.75)


def test_dynmole_renyi():
    spec = parse(minimal(routing_strategy="dynmole", num_experts=6, entropy_type="renyi"))
    assert spec.entropy_renyi is True


def test_mola_defaults():
    assert parse(minimal(routing_strategy="mola", num_experts=4)).top_k == 2


def test_explicit_values_override_defaults():
    spec = parse(config_for("mixlora-dynamic", top_p=0.6, temperature=0.5, act_fn="gelu"))
    assert (spec.top_p, spec.temperature, spec.act_fn) == (pytest.approx(0.6), 0.5, "gelu")
    spec = parse(config_for("mixlora", top_k=3))
    assert spec.top_k == 3


def test_training_only_keys_are_ignored():
    spec = parse(
        config_for(
            "mixlora",
            lora_dropout=0.0,
            jitter_noise=0.1,
            router_aux_loss_coef=0.01,
            router_init_range=0.02,
            lora_init="gaussian",
            expert_capacity=8,
        )
    )
    assert spec.family is AdapterFamily.MIXLORA
