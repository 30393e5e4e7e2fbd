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
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from torch import nn
from transformers.activations import ACT2FN

from support.tiny_models import load_reference

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
LEGACY_PROJ = {"w1_proj": "gate_proj", "w2_proj": "down_proj", "w3_proj": "up_proj"}
MODERN_TO_LEGACY = {v: k for k, v in LEGACY_PROJ.items()}
PEFT_TYPE_FAMILY = {"LORAMOE": "loramoe", "MOLA": "mola", "DYNMOLE": "dynmole"}
MIXLORA_STRATEGIES = ("mixlora", "mixlora-dynamic", "mixlora-switch")
PLUGIN_FAMILIES = ("loramoe", "mola", "dynmole")
PREFIX = {"loramoe": "loramoe", "mola": "mola", "dynmole": "dynmole"}

Expert = tuple[torch.Tensor, torch.Tensor, float]  # (A [r, in], B [out, r], scale)


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


# ----------------------------------------------------------------------------- routing rules


@dataclass
class Route:
    """One token's routing decision: expert -> weight, plus diagnostics."""

    weights: dict[int, float]
    margin: float = math.inf  # distance of the decision from the nearest boundary
    dense: bool = False  # DynMoLE: the high-entropy branch switched on every expert
    beyond_keep: bool = False  # DynMoLE: top-p kept more than keep_top_k (not via entropy)


def _descending(p: Sequence[float]) -> list[int]:
    return sorted(range(len(p)), key=lambda e: -p[e])


def softmax(z: Sequence[float]) -> list[float]:
    m = max(z)
    ex = [math.exp(v - m) for v in z]
    s = sum(ex)
    return [v / s for v in ex]


def route_top_k(p: Sequence[float], k: int) -> Route:
    """§2.2 / §2.6 MoLA: top-k, renormalised over the selected experts."""
    order = _descending(p)
    k = min(k, len(p))
    chosen = order[:k]
    total = sum(p[e] for e in chosen)
    margin = p[order[k - 1]] - p[order[k]] if k < len(p) else math.inf
    return Route({e: p[e] / total for e in chosen}, margin)


def route_top_p(p: Sequence[float], top_p: float, temperature: float) -> Route:
    """§2.3: (p / T when T > 0), keep ranks with cumsum <= top_p plus the crossing one; raw
    (divided) probabilities, not renormalised; all experts if nothing crosses."""
    q = [v / temperature for v in p] if temperature > 0 else list(p)
    kept: dict[int, float] = {}
    c, margin, crossed = 0.0, math.inf, False
    for e in _descending(q):
        c += q[e]
        margin = min(margin, abs(c - top_p))
        if not crossed:
            kept[e] = q[e]
        crossed = crossed or c > top_p
    return Route(kept, margin)


def route_switch(p: Sequence[float]) -> Route:
    """§2.4 as mixserve implements it: p_max * FFN of the argmax expert, no capacity."""
    order = _descending(p)
    margin = p[order[0]] - p[order[1]] if len(p) > 1 else math.inf
    return Route({order[0]: p[order[0]]}, margin)


def route_dense(p: Sequence[float]) -> Route:
    """§2.6 LoRAMoE: soft mixture over every expert."""
    return Route(dict(enumerate(p)))


def normalised_entropy(p: Sequence[float], q: float, kind: str, eps: float) -> float:
    """§2.7 step 3: Tsallis or Renyi entropy of (p + eps), normalised; Shannon/log E at q = 1."""
    n = len(p)
    pe = [v + eps for v in p]
    if q == 1.0:
        return -sum(v * math.log(v) for v in pe) / math.log(n)
    if kind == "tsallis":
        h = (1.0 - sum(v**q for v in pe)) / (q - 1.0)
        return h / ((1.0 - n ** (1.0 - q)) / (q - 1.0))
    if kind == "renyi":
        return (1.0 / (1.0 - q)) * math.log(sum(v**q for v in pe) + 1e-10) / math.log(n)
    raise ValueError(f"unknown entropy_type {kind!r}")


def route_dynmole(p: Sequence[float], config: dict[str, object]) -> Route:
    """§2.7: strictly-within top-p plus at least keep_top_k; every expert when the normalised
    entropy exceeds the threshold (only if q > 0 and threshold < 1); raw probabilities."""
    threshold = float(config.get("entropy_threshold", 0.9))
    q = float(config.get("entropy_index", 1.1))
    kind = str(config.get("entropy_type") or "tsallis")
    eps = float(config.get("entropy_eps", 1e-5))
    keep_top_k = int(config.get("keep_top_k", 2))
    top_p = float(config.get("top_p", 0.75))
    order = _descending(p)
    kept: set[int] = set(order[:keep_top_k])
    c, margin = 0.0, math.inf
    for rank, e in enumerate(order):
        c += p[e]
        if c <= top_p:
            kept.add(e)
        if rank >= keep_top_k:  # forced ranks cannot flip
            margin = min(margin, abs(c - top_p))
    beyond_keep = len(kept) > min(keep_top_k, len(p))
    dense = False
    if q > 0 and threshold < 1.0:
        h = normalised_entropy(p, q, kind, eps)
        dense = h > threshold
        margin = abs(h - threshold) if dense else min(margin, abs(h - threshold))
    if dense:
        kept = set(range(len(p)))
        beyond_keep = False
    return Route({e: p[e] for e in sorted(kept)}, margin, dense, beyond_keep)


def route(family: str, p: Sequence[float], config: dict[str, object]) -> Route:
    if family in ("mixlora", "mola"):
        return route_top_k(p, int(config.get("top_k", 2)))
    if family == "mixlora-dynamic":
        return route_top_p(p, float(config.get("top_p", 0.8)), float(config.get("temperature", 0)))
    if family == "mixlora-switch":
        return route_switch(p)
    if family == "loramoe":
        return route_dense(p)
    if family == "dynmole":
        return route_dynmole(p, config)
    raise ValueError(family)


# ----------------------------------------------------------------------------- statistics


@dataclass
class RoutingStats:
    """What the routers did, over every routed (site, token) the oracle computed."""

    routed: Counter[str] = field(default_factory=Counter)  # site -> routed tokens
    experts_per_token: Counter[int] = field(default_factory=Counter)
    dense_tokens: int = 0  # DynMoLE high-entropy branch
    beyond_keep_tokens: int = 0  # DynMoLE top-p kept more than keep_top_k
    min_margin: float = math.inf

    def record(self, site: str, decision: Route) -> None:
        self.routed[site] += 1
        self.experts_per_token[len(decision.weights)] += 1
        self.dense_tokens += decision.dense
        self.beyond_keep_tokens += decision.beyond_keep
        self.min_margin = min(self.min_margin, decision.margin)

    @property
    def total(self) -> int:
        return sum(self.routed.values())


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
