"""Which tensors an adapter must hold, by family (mixlora_spec.md §1.3), and legacy renames.

Every layer of the base model is adapted (PEFT's layers_to_transform aside); a key is
``{prefix}.layers.{i}.{self_attn|mlp}.{proj}...``:

- plain LoRA sites: ``....{proj}.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r]
- plugin-MoE sites: ``....{proj}.moe_gate.weight`` [E, in] and ``....{proj}.experts.{j}.lora_{A,B}``
- MixLoRA FFN: ``mixlora.layers.{i}.mlp.moe_gate.weight`` [E, hidden] and
  ``mixlora.layers.{i}.mlp.{proj}.experts.{j}.lora_{A,B}.weight``
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mixserve.adapters.errors import MissingTensorError
from mixserve.adapters.spec import (
    LEGACY_PROJECTION_NAMES,
    AdapterFamily,
    AdapterSpec,
    SiteKind,
    canonical_projection_order,
    module_group,
)
from mixserve.model.arch import PROJECTIONS, ArchConfig

# Prefixes PEFT writes for LoRA on a causal LM (and on a bare decoder).
PEFT_PREFIXES = ("base_model.model.model", "base_model.model")
_PEFT_KEY = re.compile(
    r"^(?P<prefix>.+?)\.layers\.(\d+)\.(self_attn|mlp)\.(?P<proj>\w+)\.lora_[AB]\.weight$"
)
_LEGACY_ROUTER = re.compile(r"^mixlora\.layers\.(\d+)\.gate\.weight$")
_LEGACY_EXPERT = re.compile(r"^mixlora\.layers\.(\d+)\.experts\.(\d+)\.(\w+)\.(lora_[AB]\.weight)$")


@dataclass(frozen=True, slots=True)
class ExpectedTensor:
    key: str
    projection: str | None  # None: the MixLoRA FFN router
    layer: int
    expert: int
    role: str  # "A", "B" or "router"
    shape: tuple[int, int]
    dim_names: tuple[str, str]  # what each dimension is, for error messages


def rename_legacy(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """m-LoRA era MixLoRA ("mixtral") names -> MoE-PEFT names (as the authors' converter does)."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        router = _LEGACY_ROUTER.match(key)
        expert = _LEGACY_EXPERT.match(key)
        if router:
            key = f"mixlora.layers.{router.group(1)}.mlp.moe_gate.weight"
        elif expert:
            layer, idx, proj, leaf = expert.groups()
            proj = LEGACY_PROJECTION_NAMES.get(proj, proj)
            key = f"mixlora.layers.{layer}.mlp.{proj}.experts.{idx}.{leaf}"
        renamed[key] = value
    return renamed


def peft_prefix(spec: AdapterSpec, weights: dict[str, torch.Tensor], file: str) -> str:
    """The prefix a plain-LoRA file uses before `.layers.`."""
    prefixes = {m.group("prefix") for k in weights if (m := _PEFT_KEY.match(k))}
    for candidate in PEFT_PREFIXES:
        if candidate in prefixes:
            return candidate
    raise MissingTensorError(
        spec.name,
        f"no LoRA tensors named '{PEFT_PREFIXES[0]}.layers.<i>.<module>.<proj>.lora_A.weight'",
        file=file,
    )


def targets_from_keys(weights: dict[str, torch.Tensor], prefix: str) -> tuple[str, ...]:
    found = {
        m.group("proj")
        for k in weights
        if (m := _PEFT_KEY.match(k))
        and m.group("prefix") == prefix
        and m.group("proj") in PROJECTIONS
    }
    return canonical_projection_order(found)


def _pair(
    base: str,
    projection: str,
    layer: int,
    expert: int,
    r: int,
    in_features: int,
    out_features: int,
    in_name: str,
    out_name: str,
) -> list[ExpectedTensor]:
    return [
        ExpectedTensor(
            f"{base}.lora_A.weight",
            projection,
            layer,
            expert,
            "A",
            (r, in_features),
            ("rank", in_name),
        ),
        ExpectedTensor(
            f"{base}.lora_B.weight",
            projection,
            layer,
            expert,
            "B",
            (out_features, r),
            (out_name, "rank"),
        ),
    ]


_DIM_NAMES = {
    "q_proj": ("hidden size", "q heads x head_dim"),
    "k_proj": ("hidden size", "kv heads x head_dim"),
    "v_proj": ("hidden size", "kv heads x head_dim"),
    "o_proj": ("q heads x head_dim", "hidden size"),
    "gate_proj": ("hidden size", "intermediate size"),
    "up_proj": ("hidden size", "intermediate size"),
    "down_proj": ("intermediate size", "hidden size"),
}


def expected_tensors(spec: AdapterSpec, arch: ArchConfig, prefix: str) -> Iterator[ExpectedTensor]:
    """Every tensor the spec implies for this base model, in a stable order (lazily: a config
    claiming absurdly many experts fails at its first missing tensor, not after listing them)."""
    for layer in range(arch.num_layers):
        if not spec.uses_layer(layer):
            continue
        if spec.family is AdapterFamily.MIXLORA:
            key = f"{prefix}.layers.{layer}.mlp.moe_gate.weight"
            yield ExpectedTensor(
                key,
                None,
                layer,
                0,
                "router",
                (spec.num_experts, arch.hidden_size),
                ("num_experts", "hidden size"),
            )
        for proj in spec.target_modules:
            kind = spec.site_kind(proj)
            in_features, out_features = arch.projection_shape(proj)
            in_name, out_name = _DIM_NAMES[proj]
            r = spec.settings_for(proj, layer).r
            site = f"{prefix}.layers.{layer}.{module_group(proj)}.{proj}"
            if kind is SiteKind.LORA:
                yield from _pair(
                    site, proj, layer, 0, r, in_features, out_features, in_name, out_name
                )
                continue
            if kind is SiteKind.ROUTED:
                yield ExpectedTensor(
                    f"{site}.moe_gate.weight",
                    proj,
                    layer,
                    0,
                    "router",
                    (spec.num_experts, in_features),
                    ("num_experts", in_name),
                )
            for expert in range(spec.num_experts):
                yield from _pair(
                    f"{site}.experts.{expert}",
                    proj,
                    layer,
                    expert,
                    r,
                    in_features,
                    out_features,
                    in_name,
                    out_name,
                )
