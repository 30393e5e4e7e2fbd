"""Helpers for the parse_adapter_config tests: adapter configs as MoE-PEFT exports them, or
minimal ones, parsed as if read from FILE."""

from __future__ import annotations

from typing import Any

from mixserve.adapters.config_parser import parse_adapter_config
from mixserve.adapters.spec import AdapterSpec
from support.adapter_files import ALL_TARGETS, make_config

FILE = "/adapters/a/adapter_config.json"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTN + MLP  # mixserve's canonical order


def parse(raw: Any, name: str = "a") -> AdapterSpec:
    return parse_adapter_config(name, FILE, raw)


def config_for(strategy: str | None, **extra: object) -> dict[str, Any]:
    """A config as MoE-PEFT exports it (r 8, alpha 16, E 4, every target), then `extra`."""
    config = make_config(strategy, r=8, alpha=16, num_experts=4, targets=ALL_TARGETS)
    config.update(extra)
    return config


def minimal(**keys: object) -> dict[str, Any]:
    """Only what every family needs; everything else must come from the defaults."""
    return {"r": 8, "lora_alpha": 16, "target_modules": list(ALL_TARGETS), **keys}
