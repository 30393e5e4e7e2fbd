"""route() against a per-row float64 oracle (support/kernel_routing.py) written from the rules in
kernels/routing and mixlora_spec.md §2.2-2.6: top-k, top-p, switch, dense, mixed rules and
expert counts in one call. DynMoLE: test_routing_dynmole.py."""

from __future__ import annotations

import pytest
import torch
from support.kernel_routing import SlotConfig, check_route, make_inputs, make_params, one_slot

from mixserve.kernels import RoutingRule, route


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


@pytest.mark.parametrize("with_rest", [False, True])
def test_slot_runs_route_like_scattered_rows(with_rest, monkeypatch):
    """Prefill chunks (long runs of one slot) take one GEMM per run against their slot's router;
    rows between them (decode rows) go through segment_matmul. Both match the oracle, and the
    runs really take their own path (a spy on the rows segment_matmul gets)."""
    from mixserve.kernels import _grouped
    from mixserve.kernels.routing import reference

    num_experts_max = 8
    pieces = [(0, 20), (5, 17), (3, 16), (0, 18), (7, 30)]  # (slot, rows): runs of >= 16
    if with_rest:
        pieces[1:1] = [(2, 1), (8, 1), (4, 1)]
        pieces.append((1, 3))
    slot_ids = torch.cat([torch.full((n,), slot) for slot, n in pieces])
    x, router = make_inputs(
        slot_ids.shape[0], 24, num_experts_max, len(MIXED_SLOTS), seed=97, scale=(0.05, 5.0)
    )
    segmented_rows = []
    segment_matmul = _grouped.segment_matmul

    def spying(x_rows, *args, **kwargs):
        segmented_rows.append(x_rows.shape[0])
        return segment_matmul(x_rows, *args, **kwargs)

    monkeypatch.setattr(reference, "segment_matmul", spying)
    check_route(x, slot_ids, router, MIXED_SLOTS)
    assert segmented_rows == ([6] if with_rest else [])


def test_empty_batch():
    router = torch.randn(2, 4, 8)
    params = make_params([SlotConfig(RoutingRule.TOP_K, 4, top_k=2)] * 2)
    got = route(torch.zeros(0, 8), torch.zeros(0, dtype=torch.int64), router, params)
    assert got.shape == (0, 4) and got.dtype == torch.float32


@pytest.mark.parametrize("slot_picks", [range(len(MIXED_SLOTS)), [0, 5, 8]])
def test_a_memo_shared_by_the_layers_of_a_step_gives_each_layer_its_own_routing(slot_picks):
    """Several layers (different x and routers) over the same rows and one memo: each call
    equals a call without the memo, and the memo holds the rows' settings after the first."""
    slots = [MIXED_SLOTS[i] for i in slot_picks]  # all rules, or one rule (TOP_K) alone
    params = make_params(slots)
    gen = torch.Generator().manual_seed(92)
    slot_ids = torch.randint(0, len(slots), (120,), generator=gen)
    memo: dict[str, object] = {}
    for layer in range(3):
        x, router = make_inputs(120, 24, 8, len(slots), seed=93 + layer)
        want, _ = check_route(x, slot_ids, router, slots)
        got = route(x, slot_ids, router, params, memo)
        assert torch.equal(got, want)
        assert "row_settings" in memo


def test_a_memo_handed_other_rows_rebuilds_their_settings():
    """The memo remembers which slot_ids and params it was built for: other rows (or other
    params) with the same memo route by their own slots, not the memoized ones."""
    params = make_params(MIXED_SLOTS)
    gen = torch.Generator().manual_seed(95)
    memo: dict[str, object] = {}
    x, router = make_inputs(60, 24, 8, len(MIXED_SLOTS), seed=96)
    first = torch.randint(0, len(MIXED_SLOTS), (60,), generator=gen)
    route(x, first, router, params, memo)
    built = memo["row_settings"]
    again = route(x, first, router, params, memo)
    assert memo["row_settings"] is built  # the same objects: reused
    other = torch.flip(first, (0,))
    want, _ = check_route(x, other, router, MIXED_SLOTS)
    assert torch.equal(route(x, other, router, params, memo), want)
    assert memo["row_settings"] is not built
    assert torch.equal(again, check_route(x, first, router, MIXED_SLOTS)[0])
