"""Triton route() against the torch reference: every rule alone and mixed in one launch, padded
and partial expert counts, fp32/bf16/fp16 inputs, exact ties, strided inputs.

The reference runs on the CPU over the same inputs. Rows whose decisions (a rank swap, the
nucleus cut, the entropy switch) sit within MIN_MARGIN of their threshold in float64 are left
out of the comparison: there float32 rounding may legitimately flip them.
"""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch
from support.kernel_routing import MIN_MARGIN, make_params
from support.kernel_routing import SlotConfig as Slot

from mixserve.kernels import RoutingParams, RoutingRule, route
from mixserve.kernels.routing import reference
from mixserve.kernels.routing import triton as routing_triton

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]
# Logits are fp32 from the same (dtype-rounded) x in both, so one tolerance serves every dtype.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
# (rows, hidden): interpreter-sized on the CPU, serving-sized on a GPU.
ROWS, HIDDEN = (4096, 2048) if ON_GPU else (160, 40)


def dyn(n: int, top_p: float, thr: float, q: float, renyi: bool = False, keep: int = 2) -> Slot:
    return Slot(
        RoutingRule.DYNMOLE,
        n,
        top_p=top_p,
        entropy_threshold=thr,
        entropy_index=q,
        entropy_renyi=renyi,
        entropy_eps=1e-5,
        keep_top_k=keep,
    )


def to_device(params: RoutingParams) -> RoutingParams:
    return RoutingParams(**{f.name: getattr(params, f.name).to(DEVICE) for f in fields(params)})


def margins(x: torch.Tensor, slot_ids: torch.Tensor, router: torch.Tensor, p: RoutingParams):
    """[N] float64 distance of each row's closest decision to its threshold."""
    n_rows, e_max = x.shape[0], router.shape[1]
    num_slots, _, hidden = router.shape
    every_slot = x.double() @ router.double().reshape(-1, hidden).T  # [N, S * E]
    logits = every_slot.view(n_rows, num_slots, e_max)[torch.arange(n_rows), slot_ids]
    n = p.num_experts[slot_ids]
    ranks = torch.arange(e_max)
    valid = ranks[None, :] < n[:, None]
    probs = torch.softmax(logits.masked_fill(~valid, -math.inf), dim=-1)
    ranked, _ = probs.sort(dim=-1, descending=True, stable=True)
    gaps = torch.cat(
        [torch.full((n_rows, 1), math.inf, dtype=torch.float64), ranked[:, :-1] - ranked[:, 1:]],
        dim=1,
    )

    def gap_at(m: torch.Tensor) -> torch.Tensor:  # the cut between rank m - 1 and rank m
        inner = (m > 0) & (m < n)
        return torch.where(inner, gaps.gather(1, m.clamp(0, e_max - 1)[:, None])[:, 0], math.inf)

    def closest(values: torch.Tensor, target: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        return torch.where(where, (values - target[:, None]).abs(), math.inf).min(dim=1).values

    rule, ranked_valid = p.rule[slot_ids], ranks[None, :] < n[:, None]
    top_p = p.top_p[slot_ids].double()
    out = torch.full((n_rows,), math.inf, dtype=torch.float64)
    out = torch.where(rule == RoutingRule.TOP_K, gap_at(p.top_k[slot_ids]), out)
    out = torch.where(rule == RoutingRule.SWITCH, gap_at(torch.ones_like(n)), out)
    temp = p.temperature[slot_ids].double()
    scaled = torch.where(temp[:, None] > 0, ranked / temp.clamp_min(1e-30)[:, None], ranked)
    before = scaled.cumsum(1) - scaled
    kept = ((before <= top_p[:, None]) & ranked_valid).sum(1)
    top_p_margin = torch.minimum(closest(before, top_p, ranked_valid), gap_at(kept))
    out = torch.where(rule == RoutingRule.TOP_P, top_p_margin, out)

    cum, keep_k = ranked.cumsum(1), p.keep_top_k[slot_ids]
    counted = ranked_valid & (ranks[None, :] >= keep_k[:, None])
    kept = (((cum <= top_p[:, None]) | (ranks[None, :] < keep_k[:, None])) & ranked_valid).sum(1)
    entropy = reference._normalised_entropy(
        probs,
        valid,
        n,
        p.entropy_index[slot_ids].double(),
        p.entropy_eps[slot_ids].double(),
        p.entropy_renyi[slot_ids],
    )
    thr = p.entropy_threshold[slot_ids].double()
    switch_on = (p.entropy_index[slot_ids] > 0) & (thr < 1.0)
    broadcast = switch_on & (entropy > thr)
    dyn_margin = torch.minimum(
        closest(cum, top_p, counted), torch.where(switch_on, (entropy - thr).abs(), math.inf)
    )
    dyn_margin = torch.minimum(dyn_margin, torch.where(broadcast, math.inf, gap_at(kept)))
    return torch.where(rule == RoutingRule.DYNMOLE, dyn_margin, out)


def make_inputs(slots: list[Slot], e_max: int, dtype: torch.dtype, seed: int, rows: int = ROWS):
    """x with log-uniform row norms (flat and peaked distributions), router rows of padded
    experts (>= the slot's num_experts) set to win every softmax unless masked."""
    gen = torch.Generator().manual_seed(seed)
    row_scale = torch.exp(math.log(0.05) + math.log(100.0) * torch.rand(rows, 1, generator=gen))
    x = torch.randn(rows, HIDDEN, generator=gen) * row_scale
    x[:, -1] = 1.0
    router = torch.randn(len(slots), e_max, HIDDEN, generator=gen) / math.sqrt(HIDDEN)
    router[:, :, -1] = 0.0
    for s, slot in enumerate(slots):
        router[s, slot.num_experts :, -1] = 50.0
    slot_ids = torch.randint(0, len(slots), (rows,), generator=gen)
    return x.to(dtype), slot_ids, router


def check(
    x: torch.Tensor,
    slot_ids: torch.Tensor,
    router: torch.Tensor,
    slots: list[Slot],
    min_kept: float = 0.9,
) -> torch.Tensor:
    params = make_params(slots)
    got = route(x.to(DEVICE), slot_ids.to(DEVICE), router.to(DEVICE), to_device(params)).cpu()
    want = reference.route(x, slot_ids, router, params)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all()
    ok = margins(x.float(), slot_ids, router, params) > MIN_MARGIN
    assert ok.float().mean() >= min_kept, "too much of the test data sits on decision boundaries"
    assert torch.equal(got[ok] > 0, want[ok] > 0), "selected experts differ"
    tol = TOL[x.dtype]
    torch.testing.assert_close(got[ok], want[ok], rtol=tol, atol=tol * 0.1)
    n = make_params(slots).num_experts[slot_ids]
    assert not torch.any(got[torch.arange(got.shape[1])[None, :] >= n[:, None]]), "padded expert"
    return got


RULE_CASES = {
    "top_k-8-2": ([Slot(RoutingRule.TOP_K, 8, top_k=2)], 8),
    "top_k-6of8-3": ([Slot(RoutingRule.TOP_K, 6, top_k=3)], 8),
    "top_p-8": ([Slot(RoutingRule.TOP_P, 8, top_p=0.7)], 8),
    "top_p-temp": ([Slot(RoutingRule.TOP_P, 5, top_p=0.6, temperature=0.8)], 8),
    "switch-3of4": ([Slot(RoutingRule.SWITCH, 3)], 4),
    "dense-5of8": ([Slot(RoutingRule.DENSE, 5)], 8),
    "dynmole-tsallis": ([dyn(8, 0.75, 0.9, 1.1)], 8),
    "dynmole-renyi": ([dyn(6, 0.6, 0.8, 1.5, renyi=True, keep=1)], 8),
    "dynmole-shannon-16": ([dyn(16, 0.7, 0.85, 1.0, keep=3)], 16),
    "dynmole-off": ([dyn(8, 0.6, 1.0, 0.5)], 8),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(RULE_CASES))
def test_each_rule_matches_the_reference(case, dtype):
    slots, e_max = RULE_CASES[case]
    x, slot_ids, router = make_inputs(slots, e_max, dtype, seed=len(case))
    check(x, slot_ids, router, slots)


MIXED = [
    Slot(RoutingRule.TOP_K, 4, top_k=2),
    Slot(RoutingRule.TOP_P, 6, top_p=0.7),
    Slot(RoutingRule.SWITCH, 3),
    Slot(RoutingRule.DENSE, 2),
    dyn(5, 0.75, 0.9, 1.1),
    Slot(RoutingRule.TOP_K, 8, top_k=3),
    Slot(RoutingRule.TOP_P, 8, top_p=0.5, temperature=0.8),
    dyn(8, 0.6, 0.8, 1.5, renyi=True, keep=1),
    Slot(RoutingRule.TOP_K, 1, top_k=1),
    dyn(7, 0.7, 0.85, 1.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_rules_and_expert_counts_in_one_launch(dtype):
    x, slot_ids, router = make_inputs(MIXED, 8, dtype, seed=3)
    got = check(x, slot_ids, router, MIXED)
    assert set(slot_ids.tolist()) == set(range(len(MIXED)))
    assert len(set((got > 0).sum(-1).tolist())) >= 5, "expert counts should vary across rows"


def test_exact_ties_break_by_expert_index():
    """Experts 1 and 3 read the same single feature and experts 0, 2 read nothing: their logits
    tie exactly, and the stable order keeps the lower index first."""
    slots = [
        Slot(RoutingRule.TOP_K, 4, top_k=1),
        Slot(RoutingRule.SWITCH, 4),
        Slot(RoutingRule.TOP_P, 4, top_p=0.3),
        dyn(4, 0.3, 0.99, 1.1, keep=1),
        Slot(RoutingRule.TOP_K, 4, top_k=3),
    ]
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(64, 16, generator=gen)
    router = torch.zeros(len(slots), 4, 16)
    router[:, 1, 0] = router[:, 3, 0] = 1.0
    slot_ids = torch.arange(64) % len(slots)
    params = make_params(slots)
    got = route(x.to(DEVICE), slot_ids.to(DEVICE), router.to(DEVICE), to_device(params)).cpu()
    want = reference.route(x, slot_ids, router, params)
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    single = (slot_ids < 2).nonzero()[:, 0]  # top-1 and switch: one of the tied pair
    chosen = got[single].argmax(-1)
    assert torch.equal(chosen, torch.where(x[single, 0] > 0, 1, 0))


def test_strided_input_and_empty_batch():
    slots = [Slot(RoutingRule.TOP_K, 8, top_k=2), dyn(8, 0.7, 0.9, 1.1)]
    x, slot_ids, router = make_inputs(slots, 8, torch.float32, seed=5)
    wide = torch.cat([x, torch.randn_like(x)], dim=1)
    strided = wide[:, : x.shape[1]]  # [N, K] view with row stride 2K
    assert not strided.is_contiguous()
    check(strided, slot_ids, router, slots)
    params = to_device(make_params(slots))
    empty = routing_triton.route(
        torch.zeros(0, HIDDEN, device=DEVICE),
        torch.zeros(0, dtype=torch.int64, device=DEVICE),
        router.to(DEVICE),
        params,
    )
    assert empty.shape == (0, 8) and empty.dtype == torch.float32


def test_dispatch_follows_the_env(monkeypatch):
    slots = [Slot(RoutingRule.TOP_P, 8, top_p=0.7)]
    x, slot_ids, router = make_inputs(slots, 8, torch.float32, seed=6, rows=32)
    x, slot_ids, router = x.to(DEVICE), slot_ids.to(DEVICE), router.to(DEVICE)
    params = to_device(make_params(slots))
    called = []
    monkeypatch.setattr(routing_triton, "route", lambda *a: called.append(1) or torch.ones(1))
    assert route(x, slot_ids, router, params).shape == (1,)
    monkeypatch.setenv("MIXSERVE_KERNELS", "reference")
    if not ON_GPU:  # the reference's grouped matmul is checked on the CPU only
        assert route(x, slot_ids, router, params).shape == (32, 8)
    assert called == [1]
