"""The float64 oracle's reading of an adapter folder (mixlora_spec.md §1): ``adapter_config.json``
and the weight file, read independently of mixserve (see support/oracle.py)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
LEGACY_PROJ = {"w1_proj": "gate_proj", "w2_proj": "down_proj", "w3_proj": "up_proj"}
MODERN_TO_LEGACY = {v: k for k, v in LEGACY_PROJ.items()}
PEFT_TYPE_FAMILY = {"LORAMOE": "loramoe", "MOLA": "mola", "DYNMOLE": "dynmole"}
MIXLORA_STRATEGIES = ("mixlora", "mixlora-dynamic", "mixlora-switch")
PLUGIN_FAMILIES = ("loramoe", "mola", "dynmole")
PREFIX = {"loramoe": "loramoe", "mola": "mola", "dynmole": "dynmole"}


# ----------------------------------------------------------------------------- adapter files


@dataclass(frozen=True)
class OracleAdapter:
    """An adapter as the oracle reads it: family, settings, and float64 tensors by key."""

    family: str  # "lora" | "mixlora" | "mixlora-dynamic" | "mixlora-switch" | plugin family
    legacy: bool  # m-LoRA "mixtral" naming (w1/w2/w3, mixlora.layers.{i}.gate.weight)
    targets: tuple[str, ...]  # modern projection names
    num_experts: int
    scale: float  # top-level s: attention LoRA, plain LoRA
    expert_scale: float  # s of the experts (expert_lora overrides)
    config: dict[str, object]
    tensors: dict[str, torch.Tensor]


def lora_scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _family(config: dict[str, object]) -> tuple[str, bool]:
    """§1.2: peft_type first, then routing_strategy, else plain LoRA."""
    peft_type = str(config.get("peft_type", "")).upper()
    strategy = config.get("routing_strategy")
    if peft_type == "LORA":
        return "lora", False
    if peft_type in PEFT_TYPE_FAMILY:
        return PEFT_TYPE_FAMILY[peft_type], False
    if strategy == "mixtral":
        return "mixlora", True
    if strategy in MIXLORA_STRATEGIES or strategy in PLUGIN_FAMILIES:
        return str(strategy), False
    if peft_type == "MIXLORA":
        raise ValueError(f"unknown MixLoRA routing_strategy {strategy!r}")
    if strategy is not None:
        raise ValueError(f"unknown routing_strategy {strategy!r}")
    return "lora", False


def _read_tensors(adapter_dir: str) -> dict[str, torch.Tensor]:
    st = os.path.join(adapter_dir, "adapter_model.safetensors")
    if os.path.exists(st):
        raw = load_file(st)
    else:
        raw = torch.load(
            os.path.join(adapter_dir, "adapter_model.bin"), map_location="cpu", weights_only=True
        )
    return {k: v.detach().to(torch.float64) for k, v in raw.items()}


def read_adapter(adapter_dir: str) -> OracleAdapter:
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    family, legacy = _family(config)
    targets_raw = config["target_modules"]
    if isinstance(targets_raw, dict):
        targets_raw = [k for k, v in targets_raw.items() if v]
    targets = tuple(LEGACY_PROJ.get(t, t) for t in targets_raw)
    targets = tuple(t for t in targets if t in ATTN_PROJ + MLP_PROJ)
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    rslora = bool(config.get("use_rslora", False))
    # §1.2: expert_lora is a MixLoRA key (MoE-PEFT's MixConfig); other families ignore it.
    block = (config.get("expert_lora") or {}) if family in MIXLORA_STRATEGIES else {}
    assert isinstance(block, dict)
    expert_scale = lora_scale(
        int(block.get("r", r)),
        float(block.get("lora_alpha", alpha)),
        bool(block.get("use_rslora", rslora)),
    )
    return OracleAdapter(
        family=family,
        legacy=legacy,
        targets=targets,
        num_experts=int(config.get("num_experts", 1)),
        scale=lora_scale(r, alpha, rslora),
        expert_scale=expert_scale,
        config=config,
        tensors=_read_tensors(adapter_dir),
    )
