"""parse_adapter_config: MoE-PEFT's family precedence, the authors' defaults, PEFT options and
how each family uses each projection site (mixlora_spec.md §1.2, §1.5, §7)."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import pytest
import torch
from support.adapter_files import ALL_TARGETS, BaseDims, make_config, make_weights, save_weights
from support.tiny_models import tiny_config

from mixserve.adapters import (
    AdapterConfigError,
    AdapterFamily,
    SiteKind,
    UnknownRoutingStrategyError,
    UnsupportedAdapterError,
    load_adapter,
)
from mixserve.adapters.config_parser import parse_adapter_config
from mixserve.adapters.spec import AdapterSpec, LoraSettings
from mixserve.kernels import RoutingRule
from mixserve.model import load_arch

FILE = "/adapters/a/adapter_config.json"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTN + MLP  # mixserve's canonical order


def _parse(raw: Any, name: str = "a") -> AdapterSpec:
    return parse_adapter_config(name, FILE, raw)


def _config(strategy: str | None, **extra: object) -> dict[str, Any]:
    """A config as MoE-PEFT exports it (r 8, alpha 16, E 4, every target), then `extra`."""
    config = make_config(strategy, r=8, alpha=16, num_experts=4, targets=ALL_TARGETS)
    config.update(extra)
    return config


def _minimal(**keys: object) -> dict[str, Any]:
    """Only what every family needs; everything else must come from the defaults."""
    return {"r": 8, "lora_alpha": 16, "target_modules": list(ALL_TARGETS), **keys}


# family precedence: peft_type, then routing_strategy, else plain LoRA


@pytest.mark.parametrize(
    ("raw", "family", "strategy"),
    [
        (_minimal(), AdapterFamily.LORA, None),
        (_minimal(peft_type="LORA"), AdapterFamily.LORA, None),
        # A known peft_type wins over routing_strategy, as in lora_config_factory.
        (_minimal(peft_type="LORA", routing_strategy="mixlora"), AdapterFamily.LORA, None),
        (_minimal(routing_strategy="mixlora", num_experts=4), AdapterFamily.MIXLORA, "mixlora"),
        (
            _minimal(routing_strategy="mixlora-switch", num_experts=4),
            AdapterFamily.MIXLORA,
            "mixlora-switch",
        ),
        (_minimal(routing_strategy="loramoe", num_experts=4), AdapterFamily.LORAMOE, "loramoe"),
        (_minimal(routing_strategy="mola", num_experts=4), AdapterFamily.MOLA, "mola"),
        (_minimal(routing_strategy="dynmole", num_experts=4), AdapterFamily.DYNMOLE, "dynmole"),
        # The plugin families' peft_type alone implies their one strategy.
        (_minimal(peft_type="LORAMOE", num_experts=4), AdapterFamily.LORAMOE, "loramoe"),
        (_minimal(peft_type="MOLA", num_experts=4), AdapterFamily.MOLA, "mola"),
        (_minimal(peft_type="DYNMOLE", num_experts=4), AdapterFamily.DYNMOLE, "dynmole"),
        (
            _minimal(peft_type="MIXLORA", routing_strategy="mixlora-dynamic", num_experts=4),
            AdapterFamily.MIXLORA,
            "mixlora-dynamic",
        ),
        # An unknown peft_type falls through to routing_strategy, as MoE-PEFT does.
        (
            _minimal(peft_type="SOMETHING", routing_strategy="mola", num_experts=4),
            AdapterFamily.MOLA,
            "mola",
        ),
    ],
)
def test_family_precedence(raw: dict[str, Any], family: AdapterFamily, strategy: str | None):
    spec = _parse(raw)
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
        spec = _parse(_config(strategy))
        assert spec.rule is rule, strategy
        assert spec.key_prefix == prefixes[spec.family.value]
        assert spec.num_experts == 4
    lora = _parse(_config(None))
    assert lora.rule is RoutingRule.NONE
    assert lora.key_prefix == ""  # PEFT prefixes are read off the weight keys


def test_legacy_mixtral_is_mixlora_with_legacy_names():
    raw = _minimal(
        routing_strategy="mixtral",
        num_experts=8,
        target_modules=["q_proj", "v_proj", "w1_proj", "w2_proj", "w3_proj"],
    )
    spec = _parse(raw)
    assert spec.family is AdapterFamily.MIXLORA
    assert spec.routing_strategy == "mixlora"
    assert spec.rule is RoutingRule.TOP_K
    assert spec.legacy_names
    assert spec.target_modules == ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")


def test_legacy_projection_names_mean_nothing_outside_legacy_files(caplog):
    raw = _minimal(target_modules=["q_proj", "w1_proj"])
    with caplog.at_level(logging.WARNING):
        spec = _parse(raw)
    assert spec.target_modules == ("q_proj",)
    assert "w1_proj" in caplog.text


def test_mixlora_peft_type_without_routing_strategy_is_an_error():
    with pytest.raises(AdapterConfigError, match="required for peft_type MIXLORA") as info:
        _parse(_minimal(peft_type="MIXLORA", num_experts=4))
    assert info.value.key == "routing_strategy"
    assert info.value.file == FILE
    assert info.value.adapter == "a"


@pytest.mark.parametrize(
    ("peft_type", "strategy"),
    [("MOLA", "mixlora"), ("MIXLORA", "dynmole"), ("DYNMOLE", "loramoe"), ("LORAMOE", "mola")],
)
def test_contradicting_peft_type_and_routing_strategy_is_an_error(peft_type: str, strategy: str):
    raw = _minimal(peft_type=peft_type, routing_strategy=strategy, num_experts=4)
    with pytest.raises(AdapterConfigError, match="contradicts") as info:
        _parse(raw)
    assert info.value.key == "routing_strategy"
    assert peft_type in str(info.value) and strategy in str(info.value)


def test_unknown_routing_strategy_is_typed():
    with pytest.raises(UnknownRoutingStrategyError, match="'mixlora-topk'") as info:
        _parse(_minimal(routing_strategy="mixlora-topk", num_experts=4))
    assert info.value.key == "routing_strategy"
    assert isinstance(info.value, AdapterConfigError)


def test_unknown_peft_type_without_routing_strategy_is_unsupported():
    with pytest.raises(UnsupportedAdapterError, match="'ADALORA'") as info:
        _parse(_minimal(peft_type="ADALORA"))
    assert info.value.key == "peft_type"


def test_config_must_be_a_json_object():
    with pytest.raises(AdapterConfigError, match="JSON object") as info:
        _parse([_minimal()])
    assert info.value.file == FILE


# the authors' defaults when keys are missing


def test_mixlora_defaults():
    spec = _parse(_minimal(routing_strategy="mixlora", num_experts=8))
    assert spec.top_k == 2
    assert spec.act_fn is None  # None = the base model's hidden_act, filled in by the pool


def test_mixlora_dynamic_defaults():
    spec = _parse(_minimal(routing_strategy="mixlora-dynamic", num_experts=8))
    assert spec.top_p == pytest.approx(0.8)
    assert spec.temperature == 0.0


def test_dynmole_defaults():
    spec = _parse(_minimal(routing_strategy="dynmole", num_experts=6))
    assert spec.entropy_threshold == pytest.approx(0.9)
    assert spec.entropy_index == pytest.approx(1.1)
    assert spec.entropy_renyi is False  # tsallis: files older than 9354b27 lack entropy_type
    assert spec.entropy_eps == pytest.approx(1e-5)
    assert spec.keep_top_k == 2
    assert spec.top_p == pytest.approx(0.75)


def test_dynmole_renyi():
    spec = _parse(_minimal(routing_strategy="dynmole", num_experts=6, entropy_type="renyi"))
    assert spec.entropy_renyi is True


def test_mola_defaults():
    assert _parse(_minimal(routing_strategy="mola", num_experts=4)).top_k == 2


def test_explicit_values_override_defaults():
    spec = _parse(_config("mixlora-dynamic", top_p=0.6, temperature=0.5, act_fn="gelu"))
    assert (spec.top_p, spec.temperature, spec.act_fn) == (pytest.approx(0.6), 0.5, "gelu")
    spec = _parse(_config("mixlora", top_k=3))
    assert spec.top_k == 3


def test_training_only_keys_are_ignored():
    spec = _parse(
        _config(
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


# LoRA settings: expert_lora, rsLoRA


def test_expert_lora_overrides_only_the_experts():
    raw = _config("mixlora", expert_lora={"r": 16, "lora_alpha": 8, "lora_dropout": 0.05})
    spec = _parse(raw)
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
    spec = _parse(_config("mixlora", use_rslora=True, expert_lora={"lora_alpha": 4}))
    assert spec.expert_lora == LoraSettings(r=8, alpha=4.0, use_rslora=True)
    spec = _parse(_config("mixlora", expert_lora={"use_rslora": True}))
    assert spec.expert_lora == LoraSettings(r=8, alpha=16.0, use_rslora=True)
    assert spec.lora.use_rslora is False


def test_invalid_expert_lora_names_the_nested_key():
    with pytest.raises(AdapterConfigError, match="must be >= 1") as info:
        _parse(_config("mixlora", expert_lora={"r": 0}))
    assert info.value.key == "expert_lora.r"
    with pytest.raises(AdapterConfigError, match="must be an object") as info:
        _parse(_config("mixlora", expert_lora=[16]))
    assert info.value.key == "expert_lora"


def test_scale_is_alpha_over_r_or_over_sqrt_r_with_rslora():
    plain = _parse(_config(None, r=16, lora_alpha=32))
    assert plain.lora.scale == pytest.approx(2.0)
    rs = _parse(_config(None, r=16, lora_alpha=32, use_rslora=True))
    assert rs.lora.scale == pytest.approx(32 / math.sqrt(16))
    assert rs.lora.scale == pytest.approx(8.0)
    experts = _parse(_config("dynmole", expert_lora={"r": 4}, use_rslora=True))
    # expert_lora is a MixLoRA key only (§1.2); plugin families use the top level everywhere.
    assert experts.expert_lora == experts.lora
    assert experts.settings_for("down_proj", 0).scale == pytest.approx(16 / math.sqrt(8))


# target_modules


def test_target_modules_as_list_is_put_in_canonical_order():
    spec = _parse(_config(None, target_modules=["down_proj", "v_proj", "q_proj", "gate_proj"]))
    assert spec.target_modules == ("q_proj", "v_proj", "gate_proj", "down_proj")


def test_target_modules_as_name_to_bool_dict():
    spec = _parse(
        _config("mixlora", target_modules={"q_proj": True, "k_proj": False, "up_proj": True})
    )
    assert spec.target_modules == ("q_proj", "up_proj")


def test_unknown_target_names_are_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        spec = _parse(_config(None, target_modules=["q_proj", "lm_head", "embed_tokens"]))
    assert spec.target_modules == ("q_proj",)
    assert "lm_head" in caplog.text


def test_target_modules_naming_nothing_served_is_an_error():
    with pytest.raises(AdapterConfigError, match="names no projection") as info:
        _parse(_config(None, target_modules=["lm_head"]))
    assert info.value.key == "target_modules"


@pytest.mark.parametrize("value", [None, [1, 2], 3])
def test_target_modules_of_the_wrong_type(value: object):
    with pytest.raises(AdapterConfigError) as info:
        _parse(_config(None, target_modules=value))
    assert info.value.key == "target_modules"


@pytest.mark.parametrize("foreign", ["qkv_proj", "gate_up_proj", "dense", "fc1"])
def test_targets_of_another_model_family_are_unsupported(foreign: str):
    with pytest.raises(UnsupportedAdapterError, match=foreign) as info:
        _parse(_config("mixlora", target_modules=["o_proj", foreign]))
    assert info.value.key == "target_modules"


# PEFT LoRA options


def test_rank_and_alpha_patterns_resolve_per_site_and_layer():
    raw = _config(
        None,
        rank_pattern={"q_proj": 4, "model.layers.1.mlp.down_proj": 16},
        alpha_pattern={"layers.0.self_attn.v_proj": 3},
    )
    spec = _parse(raw)
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
    spec = _parse(_config(None, rank_pattern={"proj": 2}))
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
        _parse(_config(None, **{key: value}))
    assert info.value.key == bad_key


def test_layers_to_transform():
    assert _parse(_config(None)).layers is None
    spec = _parse(_config(None, layers_to_transform=[1, 0, 1]))
    assert spec.layers == (0, 1)
    assert _parse(_config(None, layers_to_transform=1)).layers == (1,)
    assert not _parse(_config(None, layers_to_transform=[1])).uses_layer(0)
    with pytest.raises(AdapterConfigError) as info:
        _parse(_config(None, layers_to_transform=[-1]))
    assert info.value.key == "layers_to_transform"


def test_regex_target_modules_take_the_sites_from_the_weight_keys():
    spec = _parse(_config(None, target_modules=r".*\.(q_proj|down_proj)$"))
    assert spec.targets_from_keys
    assert spec.target_modules == ()
    with pytest.raises(AdapterConfigError, match="must list module names") as info:
        _parse(_config("mola", target_modules="all-linear"))
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
        _parse(_config(None, **option))
    assert info.value.file == FILE


def test_harmless_peft_options_are_accepted():
    spec = _parse(_config(None, modules_to_save=None, bias="none", fan_in_fan_out=False))
    assert spec.family is AdapterFamily.LORA


# how each family uses each projection site


@pytest.mark.parametrize(
    ("strategy", "attn_kind", "mlp_kind"),
    [
        (None, SiteKind.LORA, SiteKind.LORA),
        ("mixlora", SiteKind.LORA, SiteKind.FFN_EXPERT),
        ("mixlora-dynamic", SiteKind.LORA, SiteKind.FFN_EXPERT),
        ("mixlora-switch", SiteKind.LORA, SiteKind.FFN_EXPERT),
        ("loramoe", SiteKind.LORA, SiteKind.ROUTED),
        ("mola", SiteKind.ROUTED, SiteKind.ROUTED),
        ("dynmole", SiteKind.ROUTED, SiteKind.ROUTED),
    ],
)
def test_site_kind_per_family(strategy: str | None, attn_kind: SiteKind, mlp_kind: SiteKind):
    spec = _parse(_config(strategy))
    experts = 1 if strategy is None else 4
    for proj in ATTN:
        assert spec.site_kind(proj) is attn_kind, proj
        assert spec.site_experts(proj) == (1 if attn_kind is SiteKind.LORA else experts)
    for proj in MLP:
        assert spec.site_kind(proj) is mlp_kind, proj
        assert spec.site_experts(proj) == (1 if mlp_kind is SiteKind.LORA else experts)


def test_untargeted_sites_are_none():
    spec = _parse(_config("mola", target_modules=["k_proj", "up_proj"]))
    assert [spec.site_kind(p) for p in PROJECTIONS] == [
        SiteKind.NONE,
        SiteKind.ROUTED,
        SiteKind.NONE,
        SiteKind.NONE,
        SiteKind.NONE,
        SiteKind.ROUTED,
        SiteKind.NONE,
    ]


# the parsed settings, end to end through load_adapter


def _write(path: str, config: dict[str, Any], weights: dict[str, torch.Tensor]) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    save_weights(path, weights, "safetensors")
    return path


def test_rank_pattern_sites_load_with_their_own_rank(tmp_path, tiny_llama_dir):
    arch = load_arch(tiny_llama_dir)
    dims = BaseDims.of(tiny_config("llama"))
    targets = ("q_proj", "v_proj")
    weights = make_weights(
        dims, None, r=8, num_experts=1, targets=targets, seed=3, delta_scale=0.5, router_scale=1.0
    )
    small = make_weights(
        dims, None, r=4, num_experts=1, targets=targets, seed=4, delta_scale=0.5, router_scale=1.0
    )
    for key in small:
        if ".layers.1." in key and ".q_proj." in key:
            weights[key] = small[key]
    config = make_config(
        None,
        r=8,
        alpha=16,
        num_experts=1,
        targets=targets,
        rank_pattern={"layers.1.self_attn.q_proj": 4},
    )
    loaded = load_adapter("pat", _write(str(tmp_path / "pat"), config, weights), arch)
    q = loaded.sites["q_proj"]
    assert q.rank == 8  # stacked to the site's largest rank, zero-padded
    assert torch.equal(q.scale[:, 0], torch.tensor([2.0, 4.0]))  # alpha 16 / r 8, then / r 4
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    assert torch.equal(q.lora_a[1, 0, :4], weights[key])
    assert not q.lora_a[1, 0, 4:].any()


def test_regex_targets_load_the_sites_present_in_the_file(tmp_path, tiny_llama_dir):
    arch = load_arch(tiny_llama_dir)
    dims = BaseDims.of(tiny_config("llama"))
    targets = ("v_proj", "down_proj")
    weights = make_weights(
        dims, None, r=8, num_experts=1, targets=targets, seed=5, delta_scale=0.5, router_scale=1.0
    )
    config = make_config(None, r=8, alpha=16, num_experts=1, targets=targets)
    config["target_modules"] = r".*\.(v_proj|down_proj|lm_head)$"
    loaded = load_adapter("rx", _write(str(tmp_path / "rx"), config, weights), arch)
    assert loaded.spec.target_modules == ("v_proj", "down_proj")
    assert set(loaded.sites) == {"v_proj", "down_proj"}


def _to_legacy(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MoE-PEFT MixLoRA names -> m-LoRA era names (the inverse of the authors' converter)."""
    legacy_proj = {"gate_proj": "w1_proj", "down_proj": "w2_proj", "up_proj": "w3_proj"}
    out = {}
    for key, value in weights.items():
        parts = key.split(".")
        layer = parts[2]
        if key.endswith("mlp.moe_gate.weight"):
            key = f"mixlora.layers.{layer}.gate.weight"
        elif ".experts." in key:
            proj, expert, leaf = parts[4], parts[6], ".".join(parts[7:])
            key = f"mixlora.layers.{layer}.experts.{expert}.{legacy_proj[proj]}.{leaf}"
        out[key] = value
    return out


def test_legacy_mixtral_files_load_like_the_modern_ones(tmp_path, tiny_llama_dir):
    arch = load_arch(tiny_llama_dir)
    dims = BaseDims.of(tiny_config("llama"))
    targets = ("q_proj",) + MLP
    weights = make_weights(
        dims,
        "mixlora",
        r=8,
        num_experts=4,
        targets=targets,
        seed=6,
        delta_scale=0.5,
        router_scale=2.0,
    )
    modern_cfg = make_config("mixlora", r=8, alpha=16, num_experts=4, targets=targets)
    legacy_cfg = {
        **modern_cfg,
        "routing_strategy": "mixtral",
        "target_modules": ["q_proj", "w1_proj", "w2_proj", "w3_proj"],
    }
    del legacy_cfg["peft_type"]  # m-LoRA era files predate peft_type
    modern = load_adapter("m", _write(str(tmp_path / "m"), modern_cfg, weights), arch)
    legacy = load_adapter("l", _write(str(tmp_path / "l"), legacy_cfg, _to_legacy(weights)), arch)
    assert legacy.spec.legacy_names
    assert legacy.ffn_router is not None and modern.ffn_router is not None
    assert torch.equal(legacy.ffn_router, modern.ffn_router)
    assert set(legacy.sites) == set(modern.sites)
    for proj, site in modern.sites.items():
        other = legacy.sites[proj]
        assert other.kind is site.kind
        assert torch.equal(other.lora_a, site.lora_a)
        assert torch.equal(other.lora_b, site.lora_b)
        assert torch.equal(other.scale, site.scale)
