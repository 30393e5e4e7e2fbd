"""AdapterSpec: what an adapter is, as its adapter_config.json says (mixlora_spec.md §1.2, §7).

Family precedence is MoE-PEFT's: a known ``peft_type`` first, then ``routing_strategy``, else plain
LoRA. Defaults are the authors' code defaults. Values are checked here; tensors in `layout.py`.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

from mixserve.kernels import RoutingRule
from mixserve.model.arch import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, PROJECTIONS


class AdapterFamily(str, enum.Enum):
    LORA = "lora"
    MIXLORA = "mixlora"
    LORAMOE = "loramoe"
    MOLA = "mola"
    DYNMOLE = "dynmole"


class SiteKind(enum.IntEnum):
    """How an adapter uses one projection site (stored per slot in the pool)."""

    NONE = 0
    LORA = 1  # one unrouted LoRA
    ROUTED = 2  # plugin MoE: a router of its own over expert LoRAs (LoRAMoE, MoLA, DynMoLE)
    FFN_EXPERT = 3  # MixLoRA: expert LoRAs inside whole-FFN experts, routed once per layer


@dataclass(frozen=True, slots=True)
class LoraSettings:
    r: int
    alpha: float
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


# Legacy m-LoRA names of the MLP projections (routing_strategy "mixtral").
LEGACY_PROJECTION_NAMES = {"w1_proj": "gate_proj", "w2_proj": "down_proj", "w3_proj": "up_proj"}
# Projections of other base families (Phi, Phi3, GLM) that MoE-PEFT also knows.
FOREIGN_PROJECTIONS = (
    "dense",
    "fc1",
    "fc2",
    "qkv_proj",
    "gate_up_proj",
    "dense_h_to_4h",
    "dense_4h_to_h",
)

FAMILY_KEY_PREFIX = {
    AdapterFamily.MIXLORA: "mixlora",
    AdapterFamily.LORAMOE: "loramoe",
    AdapterFamily.MOLA: "mola",
    AdapterFamily.DYNMOLE: "dynmole",
}

STRATEGY_RULE = {
    "mixlora": RoutingRule.TOP_K,
    "mixlora-dynamic": RoutingRule.TOP_P,
    "mixlora-switch": RoutingRule.SWITCH,
    "loramoe": RoutingRule.DENSE,
    "mola": RoutingRule.TOP_K,
    "dynmole": RoutingRule.DYNMOLE,
}


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    name: str
    family: AdapterFamily
    routing_strategy: str | None  # None for plain LoRA
    target_modules: tuple[str, ...]  # canonical projection names, in PROJECTIONS order
    lora: LoraSettings  # attention LoRA and plain sites
    expert_lora: LoraSettings  # experts (the `expert_lora` block, else the top level)
    num_experts: int = 1
    rule: RoutingRule = RoutingRule.NONE
    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 0.0
    act_fn: str | None = None  # MixLoRA expert activation; None = the base model's
    entropy_threshold: float = 0.0
    entropy_index: float = 0.0
    entropy_renyi: bool = False
    entropy_eps: float = 0.0
    keep_top_k: int = 0
    key_prefix: str = ""  # MoE-PEFT families; plain LoRA prefixes are found from the keys
    legacy_names: bool = False  # m-LoRA era MixLoRA ("mixtral") weight names
    layers: tuple[int, ...] | None = None  # PEFT layers_to_transform; None = every layer
    rank_pattern: tuple[tuple[str, int], ...] = ()  # PEFT: module-name pattern -> r
    alpha_pattern: tuple[tuple[str, float], ...] = ()  # PEFT: module-name pattern -> alpha
    targets_from_keys: bool = False  # PEFT regex / "all-linear" targets: sites come from the keys
    dora_without_magnitude: bool = False  # MoE-PEFT DoRA: reloads as plain LoRA (§2.8)

    @property
    def is_moe(self) -> bool:
        return self.family is not AdapterFamily.LORA

    def site_kind(self, projection: str) -> SiteKind:
        if projection not in self.target_modules:
            return SiteKind.NONE
        family = self.family
        if family is AdapterFamily.LORA:
            return SiteKind.LORA
        if family is AdapterFamily.MIXLORA:
            return SiteKind.FFN_EXPERT if projection in MLP_PROJECTIONS else SiteKind.LORA
        if family is AdapterFamily.LORAMOE:
            return SiteKind.ROUTED if projection in MLP_PROJECTIONS else SiteKind.LORA
        return SiteKind.ROUTED  # MoLA and DynMoLE route every targeted projection

    def site_experts(self, projection: str) -> int:
        kind = self.site_kind(projection)
        return self.num_experts if kind in (SiteKind.ROUTED, SiteKind.FFN_EXPERT) else 1

    def settings_for(self, projection: str, layer_idx: int) -> LoraSettings:
        """r / alpha of one site in one layer (expert_lora for experts, PEFT patterns for LoRA)."""
        if self.site_kind(projection) in (SiteKind.ROUTED, SiteKind.FFN_EXPERT):
            return self.expert_lora
        if not (self.rank_pattern or self.alpha_pattern):
            return self.lora
        module = f"model.layers.{layer_idx}.{module_group(projection)}.{projection}"
        r = _pattern_value(self.rank_pattern, module, self.lora.r)
        alpha = _pattern_value(self.alpha_pattern, module, self.lora.alpha)
        return LoraSettings(r=int(r), alpha=float(alpha), use_rslora=self.lora.use_rslora)

    def max_rank(self, projection: str, num_layers: int) -> int:
        return max(self.settings_for(projection, i).r for i in range(num_layers))

    def uses_layer(self, layer_idx: int) -> bool:
        return self.layers is None or layer_idx in self.layers


def module_group(projection: str) -> str:
    return "self_attn" if projection in ATTENTION_PROJECTIONS else "mlp"


def _pattern_value(patterns: tuple[tuple[str, float], ...], module: str, default: float) -> float:
    # PEFT's get_pattern_key: the first pattern that matches the end of the module name.
    for pattern, value in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def canonical_projection_order(names: set[str]) -> tuple[str, ...]:
    return tuple(p for p in PROJECTIONS if p in names)
