"""parse_adapter_config: LoRA settings (expert_lora, rsLoRA), target_modules and PEFT's LoRA
options (rank/alpha patterns, layers_to_transform, regex targets, unserved options)
(mixlora_spec.md §1.2, §7)."""

from __future__ import annotations

import logging
import math

import pytest
from support.config_parsing import ATTN, FILE, MLP, config_for, parse

from mixserve.adapters import AdapterConfigError, AdapterFamily, UnsupportedAdapterError
from mixserve.adapters.spec import LoraSettings

# LoRA settings: expert_lora, rsLoRA


def test_expert_lora_overrides_only_the_experts():
    raw = config_for("mixlora", expert_lora={"r": 16, "lora_alpha": 8, "lora_dropout": 0.05})
    spec = parse(raw)
    assert spec.lora == LoraSettings(r=8, alpha=16.0)
    assert spec.expert_lora == LoraSettings(r=16, alpha=8.0)
    for layer in (0, 1):
        for proj in ATTN:
            assert spec.settings_for(proj, layer) == spec.lora
        for proj in MLP:
            assert spec.settings_for(proj, layer) == spec.expert_lora
    assert spec.max_rank("q_proj", 2) == 8
    assert spec.max_rank("down_proj", 2) == 16


def test_expert_lora_inherits_unset_fields_from_the_top_level():
    spec = parse(config_for("mixlora", use_rslora=True, expert_lora={"lora_alpha": 4}))
    assert spec.expert_lora == LoraSettings(r=8, alpha=4.0, use_rslora=True)
    spec = parse(config_for("mixlora", expert_lora={"use_rslora": True}))
    assert spec.expert_lora == LoraSettings(r=8, alpha=16.0, use_rslora=True)
    assert spec.lora.use_rslora is False


def test_invalid_expert_lora_names_the_nested_key():
    with pytest.raises(AdapterConfigError, match="must be >= 1") as info:
        parse(config_for("mixlora", expert_lora={"r": 0}))
    assert info.value.key == "expert_lora.r"
    with pytest.raises(AdapterConfigError, match="must be an object") as info:
        parse(config_for("mixlora", expert_lora=[16]))
    assert info.value.key == "expert_lora"


def test_scale_is_alpha_over_r_or_over_sqrt_r_with_rslora():
    plain = parse(config_for(None, r=16, lora_alpha=32))
    assert plain.lora.scale == pytest.approx(2.0)
    rs = parse(config_for(None, r=16, lora_alpha=32, use_rslora=True))
    assert rs.lora.scale == pytest.approx(32 / math.sqrt(16))
    assert rs.lora.scale == pytest.approx(8.0)
    experts = parse(config_for("dynmole", expert_lora={"r": 4}, use_rslora=True))
    # expert_lora is a MixLoRA key only (§1.2); plugin families use the top level everywhere.
    assert experts.expert_lora == experts.lora
    assert experts.settings_for("down_proj", 0).scale == pytest.approx(16 / math.sqrt(8))


# target_modules


def test_target_modules_as_list_is_put_in_canonical_order():
    spec = parse(config_for(None, target_modules=["down_proj", "v_proj", "q_proj", "gate_proj"]))
    assert spec.target_modules == ("q_proj", "v_proj", "gate_proj", "down_proj")


def test_target_modules_as_name_to_bool_dict():
    spec = parse(
        config_for("mixlora", target_modules={"q_proj": True, "k_proj": False, "up_proj": True})
    )
    assert spec.target_modules == ("q_proj", "up_proj")


def test_unknown_target_names_are_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        spec = parse(config_for(None, target_modules=["q_proj", "lm_head", "embed_tokens"]))
    assert spec.target_modules == ("q_proj",)
    assert "lm_head" in caplog.text


def test_target_modules_naming_nothing_served_is_an_error():
    with pytest.raises(AdapterConfigError, match="names no projection") as info:
        parse(config_for(None, target_modules=["lm_head"]))
    assert info.value.key == "target_modules"


@pytest.mark.parametrize("value", [None, [1, 2], 3])
def test_target_modules_of_the_wrong_type(value: object):
    with pytest.raises(AdapterConfigError) as info:
        parse(config_for(None, target_modules=value))
    assert info.value.key == "target_modules"


@pytest.mark.parametrize("foreign", ["qkv_proj", "gate_up_proj", "dense", "fc1"])
def test_targets_of_another_model_family_are_unsupported(foreign: str):
    with pytest.raises(UnsupportedAdapterError, match=foreign) as info:
        parse(config_for("mixlora", target_modules=["o_proj", foreign]))
    assert info.value.key == "target_modules"


# PEFT LoRA options


def test_rank_and_alpha_patterns_resolve_per_site_and_layer():
    raw = config_for(
        None,
        rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 16},
        alpha_pattern={"layers.0.self_attn.v_proj": 3},
    )
    spec = parse(raw)
    assert spec.settings_for("q_proj", 0) == LoraSettings(r=4, alpha=16.0)
    assert spec.settings_for("q_proj", 1) == LoraSettings(r=4, alpha=16.0)
    assert spec.settings_for("down_proj", 0) == LoraSettings(r=8, alpha=16.0)
    assert spec.settings_for("down_proj", 1) == LoraSettings(r=16, alpha=16.0)
    assert spec.settings_for("v_proj", 0) == LoraSettings(r=8, alpha=3.0)
    assert spec.settings_for("v_proj", 1) == LoraSettings(r=8, alpha=16.0)
    assert spec.settings_for("k_proj", 0) == spec.lora
    assert spec.max_rank("down_proj", 2) == 16
    assert spec.max_rank("q_proj", 2) == 4


def test_pattern_matches_whole_name_components_only():
    # "proj" must not match "q_proj": PEFT anchors a pattern at a '.' boundary.
    spec = parse(config_for(None, rank_pattern={"proj": 2}))
    assert spec.settings_for("q_proj", 0).r == 8


@pytest.mark.parametrize(
    ("key", "value", "bad_key"),
    [
        ("rank_pattern", {"q_proj": 0}, "rank_pattern.q_proj"),
        ("rank_pattern", {"q_proj": 2.5}, "rank_pattern.q_proj"),
        ("alpha_pattern", {"q_proj": -1}, "alpha_pattern.q_proj"),
        ("rank_pattern", [4], "rank_pattern"),
    ],
)
def test_invalid_patterns(key: str, value: object, bad_key: str):
    with pytest.raises(AdapterConfigError) as info:
        parse(config_for(None, **{key: value}))
    assert info.value.key == bad_key


def test_layers_to_transform():
    assert parse(config_for(None)).layers is None
    spec = parse(config_for(None, layers_to_transform=[1, 0, 1]))
    assert spec.layers == (0, 1)
    assert parse(config_for(None, layers_to_transform=1)).layers == (1,)
    assert not parse(config_for(None, layers_to_transform=[1])).uses_layer(0)
    with pytest.raises(AdapterConfigError) as info:
        parse(config_for(None, layers_to_transform=[-1]))
    assert info.value.key == "layers_to_transform"


def test_regex_target_modules_take_the_sites_from_the_weight_keys():
    spec = parse(config_for(None, target_modules=r".*\.(q_proj|down_proj)$"))
    assert spec.targets_from_keys
    assert spec.target_modules == ()
    with pytest.raises(AdapterConfigError, match="must list module names") as info:
        parse(config_for("mola", target_modules="all-linear"))
    assert info.value.key == "target_modules"


@pytest.mark.parametrize(
    "option",
    [
        {"modules_to_save": ["lm_head"]},
        {"bias": "lora_only"},
        {"lora_bias": True},
        {"fan_in_fan_out": True},
        {"trainable_token_indices": [1, 2]},
    ],
)
def test_unserved_peft_options_are_refused(option: dict[str, object]):
    name = next(iter(option))
    with pytest.raises(UnsupportedAdapterError, match=name) as info:
        parse(config_for(None, **option))
    assert info.value.file == FILE


def test_harmless_peft_options_are_accepted():
    spec = parse(config_for(None, modules_to_save=None, bias="none", fan_in_fan_out=False))
    assert spec.family is AdapterFamily.LORA
