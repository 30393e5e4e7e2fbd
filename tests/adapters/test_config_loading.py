"""The parsed adapter settings end to end through load_adapter: rank_pattern sites, regex
targets and legacy m-LoRA MixLoRA files (mixlora_spec.md §1.5, §7)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from support.adapter_files import BaseDims, make_config, make_weights, save_weights
from support.config_parsing import MLP
from support.tiny_models import tiny_config

from mixserve.adapters import load_adapter
from mixserve.model import load_arch

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
