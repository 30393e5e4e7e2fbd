"""A per-row float64 oracle for the route() kernel, written from the rules in kernels/routing and
mixlora_spec.md §2.2-2.7 (MoE-PEFT / DynMoLE code as read), and the helpers the routing tests
share: slot configs, routing params, inputs, and a check of route() against the oracle."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from mixserve.kernels import RoutingParams, RoutingRule, route

# Decisions (ranks, nucleus cut, entropy switch) closer than this to their threshold could flip
# between float32 and float64; the test data must stay clear of them.
MIN_MARGIN = 1e-5


@dataclass(frozen=True)
class SlotConfig:
    rule: RoutingRule
    num_experts: int
    top_k: int = 0
    top_p: float = 0.0
    temperature: float = 0.0
    entropy_threshold: float = 0.0
    entropy_index: float = 0.0
    entropy_renyi: bool = False
    entropy_eps: float = 0.0
    keep_top_k: int = 0


def make_params(slots: list[SlotConfig]) -> RoutingParams:
    def column(name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([getattr(s, name) for s in slots], dtype=dtype)

    return RoutingParams(
        rule=torch.tensor([int(s.rule) for s in slots], dtype=torch.int64),
        num_experts=column("num_experts", torch.int64),
        top_k=column("top_k", torch.int64),
        top_p=column("top_p", torch.float32),
        temperature=column("temperature", torch.float32),
        entropy_threshold=column("entropy_threshold", torch.float32),
        entropy_index=column("entropy_index", torch.float32),
        entropy_renyi=column("entropy_renyi", torch.bool),
        entropy_eps=column("entropy_eps", torch.float32),
        keep_top_k=column("keep_top_k", torch.int64),
    )


def as_stored(slot: SlotConfig) -> SlotConfig:
    """The slot with every float as the float32 params tensor holds it."""
    values = {}
    for f in fields(slot):
        v = getattr(slot, f.name)
        is_float = isinstance(v, float)
        values[f.name] = float(torch.tensor(v, dtype=torch.float32)) if is_float else v
    return SlotConfig(**values)


@dataclass
class RowRouting:
    weights: list[float]  # [E_max]
    margin: float  # distance of the closest decision to its threshold
    num_selected: int
    nucleus: int = 0  # DYNMOLE: ranks with cumulative mass <= top_p
    entropy: float = 0.0  # DYNMOLE
    broadcast: bool = False  # DYNMOLE


def softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    total = sum(exps)
    return [v / total for v in exps]


def normalised_entropy(p: list[float], q: float, eps: float, renyi: bool) -> float:
    n = len(p)
    shifted = [v + eps for v in p]
    if q == 1.0:
        return -sum(v * math.log(v) for v in shifted) / math.log(n)
    power_sum = sum(v**q for v in shifted)
    if renyi:
        return math.log(power_sum + 1e-10) / (1.0 - q) / math.log(n)
    return ((1.0 - power_sum) / (q - 1.0)) / ((1.0 - n ** (1.0 - q)) / (q - 1.0))


def oracle_row(x_row: torch.Tensor, router: torch.Tensor, slot: SlotConfig) -> RowRouting:
    """One row's routing weights, from scratch in float64 over the slot's first n experts."""
    n, num_experts_max = slot.num_experts, router.shape[0]
    x64 = x_row.double()
    p = softmax([float(x64 @ router[e].double()) for e in range(n)])
    order = sorted(range(n), key=lambda e: -p[e])
    ranked = [p[e] for e in order]

    def cut_gap(m: int) -> float:
        """Gap between the last kept and the first dropped rank (a swap changes the set)."""
        return ranked[m - 1] - ranked[m] if 0 < m < n else math.inf

    weights = [0.0] * num_experts_max
    rule = slot.rule

    if rule == RoutingRule.TOP_K:
        chosen = order[: slot.top_k]
        total = sum(p[e] for e in chosen)
        for e in chosen:
            weights[e] = p[e] / total
        return RowRouting(weights, cut_gap(len(chosen)), len(chosen))

    if rule == RoutingRule.TOP_P:
        scaled = [v / slot.temperature for v in p] if slot.temperature > 0 else p
        margin, before, kept = math.inf, 0.0, 0
        for e in order:
            margin = min(margin, abs(before - slot.top_p))
            if before <= slot.top_p:
                weights[e] = scaled[e]
                kept += 1
            before += scaled[e]
        return RowRouting(weights, min(margin, cut_gap(kept)), kept)

    if rule == RoutingRule.SWITCH:
        weights[order[0]] = p[order[0]]
        return RowRouting(weights, cut_gap(1), 1)

    if rule == RoutingRule.DENSE:
        return RowRouting(list(p) + [0.0] * (num_experts_max - n), math.inf, n)

    assert rule == RoutingRule.DYNMOLE
    margin, cumulative, nucleus, kept = math.inf, 0.0, 0, []
    for rank, e in enumerate(order):
        cumulative += p[e]
        inside = cumulative <= slot.top_p
        nucleus += inside
        if rank >= slot.keep_top_k:
            margin = min(margin, abs(cumulative - slot.top_p))
        if inside or rank < slot.keep_top_k:
            kept.append(e)
    q = slot.entropy_index
    entropy = normalised_entropy(p, q, slot.entropy_eps, slot.entropy_renyi)
    switch_on = q > 0 and slot.entropy_threshold < 1.0
    broadcast = switch_on and entropy > slot.entropy_threshold
    if switch_on:
        margin = min(margin, abs(entropy - slot.entropy_threshold))
    if broadcast:
        kept = list(range(n))
    else:
        margin = min(margin, cut_gap(len(kept)))
    for e in kept:
        weights[e] = p[e]
    return RowRouting(weights, margin, len(kept), nucleus, entropy, broadcast)


def oracle(
    x: torch.Tensor, slot_ids: torch.Tensor, router: torch.Tensor, slots: list[SlotConfig]
) -> list[RowRouting]:
    stored = [as_stored(s) for s in slots]
    return [
        oracle_row(x[i], router[int(slot_ids[i])], stored[int(slot_ids[i])])
        for i in range(x.shape[0])
    ]


def check_route(
    x: torch.Tensor, slot_ids: torch.Tensor, router: torch.Tensor, slots: list[SlotConfig]
) -> tuple[torch.Tensor, list[RowRouting]]:
    """Run route() and compare with the oracle; returns both for further checks."""
    got = route(x, slot_ids, router, make_params(slots))
    rows = oracle(x, slot_ids, router, slots)
    assert got.dtype == torch.float32
    assert got.shape == (x.shape[0], router.shape[1])
    assert min(r.margin for r in rows) > MIN_MARGIN, "test data sits on a decision boundary"
    want = torch.tensor([r.weights for r in rows], dtype=torch.float64)
    assert torch.equal(got > 0, want > 0), "selected experts differ"
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
    return got, rows


def make_inputs(
    num_rows: int,
    hidden: int,
    num_experts: int,
    num_slots: int = 1,
    *,
    seed: int,
    scale: tuple[float, float] = (0.05, 3.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """x with per-row norms spread log-uniformly over `scale`: flat and peaked distributions."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = math.log(scale[0]), math.log(scale[1])
    row_scale = torch.exp(lo + (hi - lo) * torch.rand(num_rows, 1, generator=gen))
    x = torch.randn(num_rows, hidden, generator=gen) * row_scale
    router = torch.randn(num_slots, num_experts, hidden, generator=gen) / math.sqrt(hidden)
    return x, router


def one_slot(num_rows: int) -> torch.Tensor:
    return torch.zeros(num_rows, dtype=torch.int64)
