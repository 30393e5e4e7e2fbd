"""Write synthetic adapters in MoE-PEFT's on-disk format (mixlora_spec.md §1.3), for tests.

Independent of mixserve's own adapter code on purpose. Tensors are random and non-zero (a zero B
would test nothing); configs carry the keys MoE-PEFT's export() writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "down_proj", "up_proj")  # MoE-PEFT's target order
ALL_TARGETS = ATTN + MLP
# Seven adapters of six families for mixed-batch tests: name -> (strategy, rank, experts,
# targets); every routing rule, ranks and expert counts all different.
MIXED_ADAPTERS = {
    "lora": (None, 4, 1, ("q_proj", "v_proj", "down_proj")),
    "mix": ("mixlora", 8, 4, ATTN + MLP),
    "dyn": ("mixlora-dynamic", 16, 8, MLP),
    "switch": ("mixlora-switch", 8, 2, ("o_proj",) + MLP),
    "lmoe": ("loramoe", 8, 3, ("k_proj",) + MLP),
    "mola": ("mola", 4, 6, ATTN + ("up_proj",)),
    "dynmole": ("dynmole", 12, 5, ("q_proj", "gate_proj", "down_proj")),
}

STRATEGY_PEFT_TYPE = {
    "mixlora": "MIXLORA",
    "mixlora-dynamic": "MIXLORA",
    "mixlora-switch": "MIXLORA",
    "loramoe": "LORAMOE",
    "mola": "MOLA",
    "dynmole": "DYNMOLE",
}
PREFIX = {"MIXLORA": "mixlora", "LORAMOE": "loramoe", "MOLA": "mola", "DYNMOLE": "dynmole"}


@dataclass(frozen=True)
class BaseDims:
    hidden: int
    intermediate: int
    q: int
    kv: int
    num_layers: int

    @staticmethod
    def of(hf_config: object) -> BaseDims:
        c = hf_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return BaseDims(
            hidden=c.hidden_size,
            intermediate=c.intermediate_size,
            q=c.num_attention_heads * head_dim,
            kv=c.num_key_value_heads * head_dim,
            num_layers=c.num_hidden_layers,
        )

    def shape(self, proj: str) -> tuple[int, int]:
        """(in, out) of a projection."""
        return {
            "q_proj": (self.hidden, self.q),
            "k_proj": (self.hidden, self.kv),
            "v_proj": (self.hidden, self.kv),
            "o_proj": (self.q, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }[proj]


def _lora_pair(
    gen: torch.Generator, r: int, din: int, dout: int, delta_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randn(r, din, generator=gen) / din**0.5
    b = torch.randn(dout, r, generator=gen) * delta_scale / r**0.5
    return a, b


def make_weights(
    dims: BaseDims,
    strategy: str | None,
    *,
    r: int,
    num_experts: int,
    targets: tuple[str, ...],
    seed: int,
    delta_scale: float,
    router_scale: float,
    expert_r: int | None = None,
) -> dict[str, torch.Tensor]:
    """strategy None = MoE-PEFT plain LoRA (PEFT naming)."""
    gen = torch.Generator().manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    peft_type = STRATEGY_PEFT_TYPE.get(strategy or "", "LORA")
    er = expert_r or r
    for i in range(dims.num_layers):
        if peft_type == "MIXLORA":
            weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = (
                torch.randn(num_experts, dims.hidden, generator=gen)
                * router_scale
                / dims.hidden**0.5
            )
        for proj in targets:
            mod = "self_attn" if proj in ATTN else "mlp"
            din, dout = dims.shape(proj)
            if peft_type == "LORA":
                a, b = _lora_pair(gen, r, din, dout, delta_scale)
                base = f"base_model.model.model.layers.{i}.{mod}.{proj}"
                weights[f"{base}.lora_A.weight"], weights[f"{base}.lora_B.weight"] = a, b
                continue
            prefix = PREFIX[peft_type]
            base = f"{prefix}.layers.{i}.{mod}.{proj}"
            plain = peft_type in ("MIXLORA", "LORAMOE") and mod == "self_attn"
            if plain:
                a, b = _lora_pair(gen, r, din, dout, delta_scale)
                weights[f"{base}.lora_A.weight"], weights[f"{base}.lora_B.weight"] = a, b
                continue
            if peft_type != "MIXLORA":
                weights[f"{base}.moe_gate.weight"] = (
                    torch.randn(num_experts, din, generator=gen) * router_scale / din**0.5
                )
            for j in range(num_experts):
                a, b = _lora_pair(gen, er, din, dout, delta_scale)
                weights[f"{base}.experts.{j}.lora_A.weight"] = a
                weights[f"{base}.experts.{j}.lora_B.weight"] = b
    return weights


def make_config(
    strategy: str | None,
    *,
    r: int,
    alpha: int,
    num_experts: int,
    targets: tuple[str, ...],
    **extra: object,
) -> dict[str, object]:
    peft_type = STRATEGY_PEFT_TYPE.get(strategy or "", "LORA")
    config: dict[str, object] = {
        "bias": "none",
        "peft_type": peft_type,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "target_modules": list(targets),
    }
    if peft_type != "LORA":
        config["routing_strategy"] = strategy
        config["num_experts"] = num_experts
    if strategy in ("mixlora", "mixlora-dynamic", "mixlora-switch"):
        config["act_fn"] = "silu"
    if strategy in ("mixlora", "mola"):
        config["top_k"] = 2
    if strategy == "mixlora-dynamic":
        config.update(top_p=0.8, temperature=0.0)
    if strategy == "mixlora-switch":
        config.update(expert_capacity=32, sparse_step=None)
    if strategy == "dynmole":
        config.update(
            entropy_threshold=0.9,
            entropy_index=1.1,
            entropy_type="tsallis",
            entropy_eps=1e-5,
            keep_top_k=2,
            top_p=0.75,
        )
    config.update(base_model_name_or_path="tiny-random", task_type="CAUSAL_LM")
    config.update(extra)
    return config


def save_weights(path: str, weights: dict[str, torch.Tensor], fmt: str) -> str:
    """fmt 'bin' (torch.save of nn.Parameters, as MoE-PEFT writes) or 'safetensors'."""
    if fmt == "bin":
        file = os.path.join(path, "adapter_model.bin")
        torch.save(
            {k: torch.nn.Parameter(v.clone(), requires_grad=False) for k, v in weights.items()},
            file,
        )
    else:
        file = os.path.join(path, "adapter_model.safetensors")
        save_file({k: v.contiguous() for k, v in weights.items()}, file)
    return file


def write_adapter(
    path: str,
    dims: BaseDims,
    strategy: str | None,
    *,
    r: int = 8,
    alpha: int = 16,
    num_experts: int = 4,
    targets: tuple[str, ...] = ALL_TARGETS,
    seed: int = 0,
    fmt: str = "bin",
    delta_scale: float = 0.5,
    router_scale: float = 2.0,
    expert_r: int | None = None,
    **config_extra: object,
) -> str:
    """Write adapter_config.json + weights into path (created); returns path."""
    os.makedirs(path, exist_ok=True)
    weights = make_weights(
        dims,
        strategy,
        r=r,
        num_experts=num_experts,
        targets=targets,
        seed=seed,
        delta_scale=delta_scale,
        router_scale=router_scale,
        expert_r=expert_r,
    )
    config = make_config(
        strategy, r=r, alpha=alpha, num_experts=num_experts, targets=targets, **config_extra
    )
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_weights(path, weights, fmt)
    return path
