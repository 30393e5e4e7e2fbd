"""The float64 oracle's routing rules (mixlora_spec.md §2.2-§2.7) on Python floats, the entropy
DynMoLE switches on, and the statistics of every routed token (see support/oracle.py)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

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
