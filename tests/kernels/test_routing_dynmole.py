"""route() for DynMoLE against a per-row float64 oracle (support/kernel_routing.py) written from
mixlora_spec.md §2.7 (DynMoLE code as read): the entropy switch to dense routing, keep_top_k as
a floor, and thresholds at or above one turning the switch off."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from support.kernel_routing import SlotConfig, check_route, make_inputs, one_slot, oracle

from mixserve.kernels import RoutingRule


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
