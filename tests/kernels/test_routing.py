"""route() against a per-row float64 oracle written from the rules in kernels/routing and
mixlora_spec.md §2.2-2.7 (MoE-PEFT / DynMoLE code as read)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import pytest
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


@pytest.mark.parametrize(("num_experts", "top_k"), [(4, 1), (4, 2), (8, 2), (8, 3), (3, 3)])
def test_top_k_renormalises_the_selected_experts(num_experts, top_k):
    x, router = make_inputs(96, 32, num_experts, seed=10 + top_k)
    slot = SlotConfig(RoutingRule.TOP_K, num_experts, top_k=top_k)
    got, _ = check_route(x, one_slot(96), router, [slot])
    assert torch.all((got > 0).sum(-1) == top_k)
    torch.testing.assert_close(got.sum(-1), torch.ones(96))


@pytest.mark.parametrize("top_p", [0.5, 0.8])
def test_top_p_keeps_the_first_rank_past_top_p_without_renormalising(top_p):
    x, router = make_inputs(128, 32, 8, seed=20)
    slot = SlotConfig(RoutingRule.TOP_P, 8, top_p=top_p)
    got, _ = check_route(x, one_slot(128), router, [slot])
    counts = set((got > 0).sum(-1).tolist())
    assert len(counts) >= 3, f"top-p rows should select varying numbers of experts, got {counts}"
    assert torch.any(got.sum(-1) < 0.99), "some rows must keep less than all the mass"


@pytest.mark.parametrize(
    ("top_p", "temperature", "keeps_all"),
    [(0.8, 0.5, False), (0.3, 1.5, False), (0.8, 2.0, True), (1.0, 0.0, True)],
)
def test_top_p_temperature_divides_probabilities(top_p, temperature, keeps_all):
    x, router = make_inputs(128, 32, 6, seed=30)
    slot = SlotConfig(RoutingRule.TOP_P, 6, top_p=top_p, temperature=temperature)
    got, _ = check_route(x, one_slot(128), router, [slot])
    selected = (got > 0).sum(-1)
    if keeps_all:
        # No prefix of the (scaled) mass exceeds top_p, so every expert stays on.
        assert torch.all(selected == 6)
    else:
        assert len(set(selected.tolist())) >= 2, "expected varying expert counts"
    if temperature > 0:
        # Weights are the divided probabilities: a row keeping every expert sums to 1/T.
        full = got[selected == 6].sum(-1)
        torch.testing.assert_close(full, torch.full_like(full, 1 / temperature))


def test_switch_takes_the_argmax_with_weight_p_max():
    x, router = make_inputs(128, 32, 8, seed=40)
    got, _ = check_route(x, one_slot(128), router, [SlotConfig(RoutingRule.SWITCH, 8)])
    assert torch.all((got > 0).sum(-1) == 1)
    assert len(set(got.argmax(-1).tolist())) >= 4, "the argmax should vary across rows"


def test_dense_is_the_softmax():
    x, router = make_inputs(64, 32, 5, seed=50)
    got, _ = check_route(x, one_slot(64), router, [SlotConfig(RoutingRule.DENSE, 5)])
    assert torch.all(got > 0)
    torch.testing.assert_close(got.sum(-1), torch.ones(64))


def split_threshold(entropies: list[float], quantile: float) -> float:
    """A threshold between two neighbouring entropies near `quantile`, clear of both."""
    ranked = sorted(entropies)
    i = int(quantile * (len(ranked) - 1))
    return (ranked[i] + ranked[i + 1]) / 2


# Renyi at q == 1 is its Shannon limit, as in the authors' renyi_entropy.
@pytest.mark.parametrize(
    ("q", "renyi"),
    [(1.1, False), (1.5, False), (0.5, False), (1.5, True), (0.7, True), (1.0, False), (1.0, True)],
    ids=[
        "tsallis-1.1",
        "tsallis-1.5",
        "tsallis-0.5",
        "renyi-1.5",
        "renyi-0.7",
        "shannon",
        "renyi-1",
    ],
)
def test_dynmole_switches_to_dense_above_the_entropy_threshold(q, renyi):
    num_rows, num_experts = 160, 8
    x, router = make_inputs(num_rows, 32, num_experts, seed=60, scale=(0.02, 6.0))
    base = SlotConfig(
        RoutingRule.DYNMOLE,
        num_experts,
        top_p=0.75,
        entropy_index=q,
        entropy_renyi=renyi,
        entropy_eps=1e-5,
        keep_top_k=2,
    )
    # Place the threshold inside the data's entropy range so both branches run.
    probe = oracle(x, one_slot(num_rows), router, [base])
    threshold = split_threshold([r.entropy for r in probe], 0.7)
    slot = replace(base, entropy_threshold=threshold)
    _, rows = check_route(x, one_slot(num_rows), router, [slot])

    routed = [r for r in rows if not r.broadcast]
    assert any(r.broadcast for r in rows) and routed
    assert all(r.num_selected == num_experts for r in rows if r.broadcast)
    assert any(r.nucleus < 2 for r in routed), "keep_top_k must force extra experts on some rows"
    assert any(r.nucleus > 2 for r in routed), "the top-p nucleus must exceed keep_top_k somewhere"
    assert all(r.num_selected >= 2 for r in rows)
    assert all(r.num_selected == max(r.nucleus, 2) for r in routed)


@pytest.mark.parametrize(("keep_top_k", "top_p"), [(1, 0.6), (2, 0.8), (3, 0.9)])
def test_dynmole_keep_top_k_is_a_floor(keep_top_k, top_p):
    num_rows, num_experts = 128, 8
    x, router = make_inputs(num_rows, 32, num_experts, seed=70 + keep_top_k)
    slot = SlotConfig(
        RoutingRule.DYNMOLE,
        num_experts,
        top_p=top_p,
        entropy_threshold=0.95,
        entropy_index=1.1,
        entropy_eps=1e-5,
        keep_top_k=keep_top_k,
    )
    got, rows = check_route(x, one_slot(num_rows), router, [slot])
    routed = [r for r in rows if not r.broadcast]
    assert torch.all((got > 0).sum(-1) >= keep_top_k)
    assert all(r.num_selected == max(r.nucleus, keep_top_k) for r in routed)
    assert any(r.nucleus < keep_top_k for r in routed)
    assert any(r.nucleus > keep_top_k for r in routed)


@pytest.mark.parametrize(
    ("q", "renyi", "threshold"),
    [(1.0, False, 1.0), (0.5, False, 1.0), (0.5, True, 1.0), (1.0, False, 1.5)],
    ids=["shannon-1.0", "tsallis-0.5-1.0", "renyi-0.5-1.0", "shannon-1.5"],
)
def test_dynmole_threshold_at_or_above_one_turns_broadcast_off(q, renyi, threshold):
    """Near-uniform rows have a normalised entropy slightly above 1 once eps is added, so only
    the 'threshold >= 1 means off' rule keeps them from being broadcast."""
    num_rows, num_experts = 32, 6
    x, router = make_inputs(num_rows, 16, num_experts, seed=80, scale=(0.03, 0.1))
    slot = SlotConfig(
        RoutingRule.DYNMOLE,
        num_experts,
        top_p=0.6,
        entropy_threshold=threshold,
        entropy_index=q,
        entropy_renyi=renyi,
        entropy_eps=1e-2,
        keep_top_k=1,
    )
    got, rows = check_route(x, one_slot(num_rows), router, [slot])
    assert all(r.entropy > 1.0 for r in rows), "rows must be ones that would otherwise broadcast"
    assert torch.all((got > 0).sum(-1) < num_experts)

    just_below = replace(slot, entropy_threshold=0.999)
    got, _ = check_route(x, one_slot(num_rows), router, [just_below])
    assert torch.all(got > 0)


MIXED_SLOTS = [
    SlotConfig(RoutingRule.TOP_K, 4, top_k=2),
    SlotConfig(RoutingRule.TOP_P, 6, top_p=0.7),
    SlotConfig(RoutingRule.SWITCH, 3),
    SlotConfig(RoutingRule.DENSE, 2),
    SlotConfig(
        RoutingRule.DYNMOLE,
        5,
        top_p=0.75,
        entropy_threshold=0.9,
        entropy_index=1.1,
        entropy_eps=1e-5,
        keep_top_k=2,
    ),
    SlotConfig(RoutingRule.TOP_K, 8, top_k=3),
    SlotConfig(RoutingRule.TOP_P, 8, top_p=0.5, temperature=0.8),
    SlotConfig(
        RoutingRule.DYNMOLE,
        8,
        top_p=0.6,
        entropy_threshold=0.8,
        entropy_index=1.5,
        entropy_renyi=True,
        entropy_eps=1e-5,
        keep_top_k=1,
    ),
    SlotConfig(RoutingRule.TOP_K, 1, top_k=1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_rules_and_expert_counts_in_one_call(dtype):
    num_rows, hidden, num_experts_max = 300, 24, 8
    x, router = make_inputs(
        num_rows, hidden, num_experts_max, len(MIXED_SLOTS), seed=90, scale=(0.05, 5.0)
    )
    # Padded experts get router rows that would win every softmax if they were not masked: the
    # last feature is a constant 1 that only they read.
    x[:, -1] = 1.0
    x = x.to(dtype)
    router[:, :, -1] = 0.0
    for s, slot in enumerate(MIXED_SLOTS):
        router[s, slot.num_experts :, -1] = 50.0
    gen = torch.Generator().manual_seed(91)
    slot_ids = torch.randint(0, len(MIXED_SLOTS), (num_rows,), generator=gen)
    got, rows = check_route(x, slot_ids, router, MIXED_SLOTS)
    for i in range(num_rows):
        n = MIXED_SLOTS[int(slot_ids[i])].num_experts
        assert torch.all(got[i, n:] == 0), f"row {i} selected a padded expert"
    assert set(slot_ids.tolist()) == set(range(len(MIXED_SLOTS)))
    dynmole_rows = [r for r, s in zip(rows, slot_ids.tolist(), strict=True) if s in (4, 7)]
    assert any(r.broadcast for r in dynmole_rows) and not all(r.broadcast for r in dynmole_rows)


def test_empty_batch():
    router = torch.randn(2, 4, 8)
    params = make_params([SlotConfig(RoutingRule.TOP_K, 4, top_k=2)] * 2)
    got = route(torch.zeros(0, 8), torch.zeros(0, dtype=torch.int64), router, params)
    assert got.shape == (0, 4) and got.dtype == torch.float32
