"""An independent float64, token-by-token oracle for every adapter family (mixlora_spec.md).

Written from the spec alone; it imports nothing from mixserve. It reads ``adapter_config.json``
and the weight file itself, loads the base model with transformers in float64 and swaps modules:

- every targeted q/k/v/o/gate/up/down ``nn.Linear`` becomes an :class:`OracleLinear` computing, one
  token at a time, ``W x + b + sum_e w_e(x) * s_e * B_e A_e x`` (plain LoRA: one expert, w = 1;
  plugin MoE sites: the site's own router on that projection's input);
- for the MixLoRA strategies the whole MLP becomes an :class:`OracleMixLoraMLP`, a loop over the
  selected whole-FFN experts ``y = sum_e w_e (W_d h_e + s B_d A_d h_e)`` with
  ``h_e = act(W_g x + s B_g A_g x) * (W_u x + s B_u A_u x)``;
- every RMSNorm is recomputed in float64 (transformers rounds it through float32).

What stays as transformers computes it: RoPE tables and the eager attention softmax (float32, then
cast back), i.e. errors of ~1e-7 relative, far below what the tests check.

Routing (spec §2.2-§2.7) is done in float64 on Python floats; every routed token is recorded in
:class:`RoutingStats` so tests can check that the interesting branches actually ran, and how
close a decision came to its boundary (``min_margin``).

Parts: :mod:`support.oracle_adapter` reads the adapter files, :mod:`support.oracle_routing` holds
the routing rules and statistics; this module swaps the model's modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.activations import ACT2FN

from support.oracle_adapter import (
    ATTN_PROJ,
    MIXLORA_STRATEGIES,
    MLP_PROJ,
    MODERN_TO_LEGACY,
    PREFIX,
    OracleAdapter,
    read_adapter,
)
from support.oracle_routing import RoutingStats, route, softmax
from support.tiny_models import load_reference

Expert = tuple[torch.Tensor, torch.Tensor, float]  # (A [r, in], B [out, r], scale)


# ----------------------------------------------------------------------------- modules


def _lora(expert: Expert, x: torch.Tensor) -> torch.Tensor:
    a, b, s = expert
    return s * (b @ (a @ x))


class OracleLinear(nn.Module):
    """A projection plus its adapter site, evaluated one token at a time in float64."""

    def __init__(
        self,
        base: nn.Linear,
        experts: list[Expert],
        router: torch.Tensor | None,
        family: str,
        config: dict[str, object],
        site: str,
        stats: RoutingStats,
    ) -> None:
        super().__init__()
        self.weight = base.weight.detach().to(torch.float64)
        self.bias = None if base.bias is None else base.bias.detach().to(torch.float64)
        self.experts, self.router = experts, router
        self.family, self.config, self.site, self.stats = family, config, site, stats

    def token(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight @ x
        if self.bias is not None:
            y = y + self.bias
        if self.router is None:
            weights = {0: 1.0}
        else:
            decision = route(self.family, softmax((self.router @ x).tolist()), self.config)
            self.stats.record(self.site, decision)
            weights = decision.weights
        for e, w in weights.items():
            y = y + w * _lora(self.experts[e], x)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.to(torch.float64).reshape(-1, x.shape[-1])
        out = torch.stack([self.token(t) for t in flat])
        return out.reshape(*x.shape[:-1], out.shape[-1])


class OracleMixLoraMLP(nn.Module):
    """§2.2-§2.4: the whole FFN as routed experts, one token at a time in float64."""

    def __init__(
        self,
        mlp: nn.Module,
        experts: dict[str, list[Expert]],  # projection -> per-expert LoRA (absent: untargeted)
        router: torch.Tensor,
        act: str,
        family: str,
        config: dict[str, object],
        stats: RoutingStats,
    ) -> None:
        super().__init__()
        self.w = {p: getattr(mlp, p).weight.detach().to(torch.float64) for p in MLP_PROJ}
        self.b = {
            p: None if getattr(mlp, p).bias is None else getattr(mlp, p).bias.detach().double()
            for p in MLP_PROJ
        }
        self.experts, self.router, self.act = experts, router, ACT2FN[act]
        self.family, self.config, self.stats = family, config, stats

    def _proj(self, proj: str, e: int, x: torch.Tensor) -> torch.Tensor:
        y = self.w[proj] @ x
        if self.b[proj] is not None:
            y = y + self.b[proj]
        if proj in self.experts:
            y = y + _lora(self.experts[proj][e], x)
        return y

    def token(self, x: torch.Tensor) -> torch.Tensor:
        decision = route(self.family, softmax((self.router @ x).tolist()), self.config)
        self.stats.record("ffn", decision)
        y = torch.zeros_like(x)
        for e, w in decision.weights.items():
            h = self.act(self._proj("gate_proj", e, x)) * self._proj("up_proj", e, x)
            y = y + w * self._proj("down_proj", e, h)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.to(torch.float64).reshape(-1, x.shape[-1])
        return torch.stack([self.token(t) for t in flat]).reshape(x.shape)


class Float64RMSNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight.detach().to(torch.float64)
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


# ----------------------------------------------------------------------------- installation


def _pair(t: dict[str, torch.Tensor], key: str, scale: float) -> Expert:
    return t[f"{key}.lora_A.weight"], t[f"{key}.lora_B.weight"], scale


def _expert_key(adapter: OracleAdapter, i: int, mod: str, proj: str, j: int) -> str:
    if adapter.legacy:
        key = f"mixlora.layers.{i}.experts.{j}.{MODERN_TO_LEGACY[proj]}"
        if f"{key}.lora_A.weight" not in adapter.tensors:
            key = f"mixlora.layers.{i}.experts.{j}.{proj}"
        return key
    prefix = "mixlora" if adapter.family in MIXLORA_STRATEGIES else PREFIX[adapter.family]
    return f"{prefix}.layers.{i}.{mod}.{proj}.experts.{j}"


def _experts(adapter: OracleAdapter, i: int, mod: str, proj: str) -> list[Expert]:
    t = adapter.tensors
    return [
        _pair(t, _expert_key(adapter, i, mod, proj, j), adapter.expert_scale)
        for j in range(adapter.num_experts)
    ]


def install(model: nn.Module, adapter: OracleAdapter, stats: RoutingStats) -> None:
    """Swap the modules of a float64 transformers model for the adapter's oracle modules."""
    t, fam = adapter.tensors, adapter.family
    mixlora = fam in MIXLORA_STRATEGIES
    act = str(adapter.config.get("act_fn") or model.config.hidden_act)
    for i, layer in enumerate(model.model.layers):
        for proj in adapter.targets:
            mod = "self_attn" if proj in ATTN_PROJ else "mlp"
            parent = getattr(layer, mod)
            if mixlora and mod == "mlp":
                continue  # handled by the whole-FFN module below
            if fam == "lora":
                key = f"base_model.model.model.layers.{i}.{mod}.{proj}"
                experts, router = [_pair(t, key, adapter.scale)], None
            elif mod == "self_attn" and (mixlora or fam == "loramoe"):  # §3: unrouted LoRA
                key = f"{'mixlora' if mixlora else PREFIX[fam]}.layers.{i}.{mod}.{proj}"
                experts, router = [_pair(t, key, adapter.scale)], None
            else:
                experts = _experts(adapter, i, mod, proj)
                router = t[f"{PREFIX[fam]}.layers.{i}.{mod}.{proj}.moe_gate.weight"]
            site = OracleLinear(
                getattr(parent, proj), experts, router, fam, adapter.config, proj, stats
            )
            setattr(parent, proj, site)
        if mixlora:
            router_key = (
                f"mixlora.layers.{i}.gate.weight"
                if adapter.legacy
                else f"mixlora.layers.{i}.mlp.moe_gate.weight"
            )
            experts = {
                proj: _experts(adapter, i, "mlp", proj)
                for proj in MLP_PROJ
                if proj in adapter.targets
            }
            layer.mlp = OracleMixLoraMLP(
                layer.mlp, experts, t[router_key], act, fam, adapter.config, stats
            )


def _swap_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child).__name__.endswith("RMSNorm"):
            setattr(module, name, Float64RMSNorm(child))
        else:
            _swap_norms(child)


class Oracle:
    """The base model in float64 with (optionally) one adapter installed."""

    def __init__(self, model_dir: str, adapter_dir: str | None = None) -> None:
        self.model = load_reference(model_dir, torch.float64)
        _swap_norms(self.model)
        self.stats = RoutingStats()
        self.adapter = None if adapter_dir is None else read_adapter(adapter_dir)
        if self.adapter is not None:
            install(self.model, self.adapter, self.stats)

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """[len, vocab] float64 logits of every position of one sequence."""
        with torch.no_grad():
            return self.model(torch.tensor([list(token_ids)])).logits[0].to(torch.float64)
