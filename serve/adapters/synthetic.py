"""Synthetic adapters in MoE-PEFT's format, for the server's demo-* adapters.

No trained MixLoRA/DynMoLE checkpoints can be downloaded on air-gapped machines, so the server
ships demo adapters generated deterministically from a seed: real formats and real routing, but
random (untrained) weights. They change what the model says; they do not make it better.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from mixserve.adapters.spec import module_group
from mixserve.model.arch import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, ArchConfig

_PEFT_TYPE = {
    None: "LORA",
    "mixlora": "MIXLORA",
    "mixlora-dynamic": "MIXLORA",
    "loramoe": "LORAMOE",
    "dynmole": "DYNMOLE",
}
_PREFIX = {"MIXLORA": "mixlora", "LORAMOE": "loramoe", "DYNMOLE": "dynmole"}


@dataclass(frozen=True, slots=True)
class SyntheticAdapter:
    name: str
    strategy: str | None  # None = plain LoRA
    rank: int
    num_experts: int
    targets: tuple[str, ...]
    seed: int
    strength: float  # std of the LoRA delta relative to the input (per coordinate)


DEMO_ADAPTERS = (
    SyntheticAdapter(
        "demo-mixlora", "mixlora", 8, 4, ATTENTION_PROJECTIONS + MLP_PROJECTIONS, 1, 0.15
    ),
    SyntheticAdapter("demo-mixlora-dynamic", "mixlora-dynamic", 8, 4, MLP_PROJECTIONS, 2, 0.15),
    SyntheticAdapter("demo-dynmole", "dynmole", 8, 4, MLP_PROJECTIONS, 3, 0.1),
    SyntheticAdapter(
        "demo-loramoe", "loramoe", 8, 3, ("q_proj", "v_proj") + MLP_PROJECTIONS, 4, 0.1
    ),
    SyntheticAdapter("demo-lora", None, 8, 1, ("q_proj", "v_proj", "o_proj"), 5, 0.3),
)


def _weights(spec: SyntheticAdapter, arch: ArchConfig) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(spec.seed)
    peft_type = _PEFT_TYPE[spec.strategy]
    prefix = _PREFIX.get(peft_type, "base_model.model.model")
    out: dict[str, torch.Tensor] = {}

    def pair(key: str, proj: str) -> None:
        d_in, d_out = arch.projection_shape(proj)
        out[f"{key}.lora_A.weight"] = torch.randn(spec.rank, d_in, generator=gen) / d_in**0.5
        out[f"{key}.lora_B.weight"] = torch.randn(d_out, spec.rank, generator=gen) * (
            spec.strength / spec.rank**0.5
        )

    for layer in range(arch.num_layers):
        if peft_type == "MIXLORA":
            out[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = (
                torch.randn(spec.num_experts, arch.hidden_size, generator=gen)
                / arch.hidden_size**0.5
            )
        for proj in spec.targets:
            base = f"{prefix}.layers.{layer}.{module_group(proj)}.{proj}"
            routed = peft_type == "DYNMOLE" or (
                peft_type in ("MIXLORA", "LORAMOE") and proj in MLP_PROJECTIONS
            )
            if not routed:
                pair(base, proj)
                continue
            if peft_type != "MIXLORA":
                d_in = arch.projection_shape(proj)[0]
                out[f"{base}.moe_gate.weight"] = (
                    torch.randn(spec.num_experts, d_in, generator=gen) / d_in**0.5
                )
            for expert in range(spec.num_experts):
                pair(f"{base}.experts.{expert}", proj)
    return out


def _config(spec: SyntheticAdapter) -> dict[str, object]:
    peft_type = _PEFT_TYPE[spec.strategy]
    config: dict[str, object] = {
        "bias": "none",
        "peft_type": peft_type,
        "r": spec.rank,
        "lora_alpha": 2 * spec.rank,
        "lora_dropout": 0.05,
        "target_modules": list(spec.targets),
    }
    if spec.strategy is not None:
        config.update(routing_strategy=spec.strategy, num_experts=spec.num_experts)
    if spec.strategy == "mixlora":
        config["top_k"] = 2
    if spec.strategy == "mixlora-dynamic":
        config.update(top_p=0.8, temperature=0.0)
    config.update(
        base_model_name_or_path="synthetic",
        task_type="CAUSAL_LM",
        mixserve_note="synthetic demo adapter: random weights, not trained",
    )
    return config


def write_synthetic_adapter(path: str, spec: SyntheticAdapter, arch: ArchConfig) -> str:
    """Write atomically (a temporary folder renamed into place); returns path."""
    if os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
        return path
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
    try:
        save_file(_weights(spec, arch), os.path.join(tmp, "adapter_model.safetensors"))
        with open(os.path.join(tmp, "adapter_config.json"), "w", encoding="utf-8") as f:
            json.dump(_config(spec), f, indent=2)
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def demo_adapter_dirs(root: str, arch: ArchConfig) -> dict[str, str]:
    """The demo adapters for this base model under root, generated on first use."""
    shape = f"{arch.model_type}-{arch.hidden_size}-{arch.intermediate_size}-{arch.num_layers}"
    folder = os.path.join(root, "demo-adapters", f"{shape}-v1")
    return {
        s.name: write_synthetic_adapter(os.path.join(folder, s.name), s, arch)
        for s in DEMO_ADAPTERS
    }
