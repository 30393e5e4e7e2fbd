"""The compiled CPU MixLoRA kernel (kernels/moe_lora_ffn/cpu.cpp) against a float64 per-row loop,
its batch invariance, and how the wrapper dispatches to it or falls back to the reference.

Skipped, with the reason, where this machine cannot build or run it (no C++ compiler, no
AVX-512): the ops then run the reference, which test_moe_lora_ffn.py covers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.moe_cases import moe_case, naive_moe

from mixserve.kernels import ExpertLora, moe_lora_ffn
from mixserve.kernels.moe_lora_ffn import cpu, reference

pytestmark = pytest.mark.skipif(
    cpu.module() is None, reason="compiled CPU kernel unavailable here (see its log warning)"
)
TOL = 2e-6  # float32 sums in another order than the float64 loop's, relative to the largest


def _case(seed, **kw):
    kw.setdefault("hidden_size", 32)
    kw.setdefault("inter", 48)
    kw.setdefault("dtype", torch.float32)
    return moe_case(seed, **kw)


def _assert_matches_loop(got, case):
    for value, want in zip(got, naive_moe(*case), strict=True):
        scale = max(float(want.abs().max()), 1e-6)
        assert float((value.double() - want).abs().max()) / scale < TOL


@pytest.mark.parametrize("rank", [8, 16, 32, 64])
@pytest.mark.parametrize(
    ("tokens", "slots_used", "experts", "k", "one_slot"),
    [
        (1, [2], 4, 1, False),  # a single row, switch routing
        (9, [0, 3], 8, 2, False),  # decode-like
        (64, [1, 2, 5], 6, 3, False),  # uneven slots, gaps in the slot range
        (120, [4], 8, 2, True),  # one slot's prefill: many pairs per group
    ],
)
def test_matches_per_row_loop(rank, tokens, slots_used, experts, k, one_slot):
    case = _case(
        rank + tokens,
        tokens=tokens,
        slots_used=slots_used,
        num_slots=6,
        experts=experts,
        k=k,
        one_slot=one_slot,
        rank=rank,
    )
    assert cpu.why_not(*case, F.silu) is None
    _assert_matches_loop(cpu.moe_lora_ffn(*case), case)


@pytest.mark.parametrize("hidden_size,inter", [(576, 1536), (16, 16)])
def test_model_shapes(hidden_size, inter):
    """SmolLM2's H and I (the engine's shape) and the smallest the vector width allows."""
    case = _case(
        3,
        tokens=20,
        slots_used=[0, 1, 2],
        num_slots=4,
        experts=4,
        k=2,
        rank=8,
        hidden_size=hidden_size,
        inter=inter,
    )
    _assert_matches_loop(cpu.moe_lora_ffn(*case), case)


def test_rows_with_any_number_of_experts_and_none():
    """Top-p and DynMoLE rows select 1 .. E experts; a row selecting nothing gets zeros."""
    case = list(_case(13, tokens=30, slots_used=[0, 2, 3], num_slots=4, experts=6, k=2, rank=8))
    gen = torch.Generator().manual_seed(5)
    num_rows = len(case[2])
    keep = torch.rand(num_rows, 6, generator=gen) < torch.linspace(0.1, 0.9, num_rows)[:, None]
    case[4] = torch.rand(num_rows, 6, generator=gen) * keep
    case[4][::5] = 0
    assert len(set((case[4] > 0).sum(1).tolist())) > 3
    hidden, delta = cpu.moe_lora_ffn(*case)
    _assert_matches_loop((hidden, delta), case)
    assert not hidden[::5].any() and not delta[::5].any()


def test_extreme_gate_values_stay_finite_and_exact():
    """SiLU's exp is clamped and evaluated by a polynomial: large positive and negative gate
    pre-activations still give silu(g) = g and 0 to float32 precision."""
    case = list(_case(21, tokens=16, slots_used=[0, 1], num_slots=2, experts=4, k=2, rank=8))
    case[1] = case[1] * torch.tensor([60.0, -60.0, 1e-3, 200.0]).repeat(case[1].shape[1] // 4)
    hidden, delta = cpu.moe_lora_ffn(*case)
    assert torch.isfinite(hidden).all() and torch.isfinite(delta).all()
    _assert_matches_loop((hidden, delta), case)


def test_a_rows_result_does_not_depend_on_the_batch():
    """Each row's pairs run in the same order whatever else is in the batch: bitwise equal to
    the row computed alone (the engine's greedy outputs must not depend on batch makeup)."""
    case = _case(9, tokens=40, slots_used=[0, 1, 2, 3], num_slots=4, experts=8, k=3, rank=16)
    x, gate_up, rows, slots, weights, *experts = case
    hidden, delta = cpu.moe_lora_ffn(*case)
    for i in (0, 7, len(rows) - 1):
        one = cpu.moe_lora_ffn(
            x, gate_up, rows[i : i + 1], slots[i : i + 1], weights[i : i + 1], *experts
        )
        assert torch.equal(one[0][0], hidden[i]) and torch.equal(one[1][0], delta[i])


def test_wrapper_takes_the_kernel_where_it_applies(monkeypatch):
    case = _case(4, tokens=24, slots_used=[0, 1], num_slots=2, experts=4, k=2, rank=8)
    calls = []
    real = cpu.moe_lora_ffn
    monkeypatch.setattr(cpu, "moe_lora_ffn", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("MIXSERVE_KERNELS", "auto")
    got = moe_lora_ffn(*case, F.silu)
    assert calls == [1]
    want = reference.moe_lora_ffn(*case, F.silu)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("MIXSERVE_KERNELS", "reference")
    moe_lora_ffn(*case, F.silu)
    monkeypatch.setenv("MIXSERVE_CPU_KERNELS", "0")  # turned off: the reference
    monkeypatch.setenv("MIXSERVE_KERNELS", "auto")
    moe_lora_ffn(*case, F.silu)
    assert calls == [1]


def _unsupported_cases():
    base = _case(6, tokens=12, slots_used=[0, 1], num_slots=2, experts=4, k=2, rank=8)
    x, gate_up, rows, slots, weights, gate, up, down = base
    separate = ExpertLora(gate.lora_a.contiguous(), gate.lora_b, gate.scale)
    yield "not SiLU", (*base, F.gelu)
    yield "not float32", (x.double(), gate_up.double(), *base[2:], F.silu)
    yield "not in one storage", (x, gate_up, rows, slots, weights, separate, up, down, F.silu)
    odd = _case(6, tokens=12, slots_used=[0], num_slots=2, experts=4, k=2, rank=8, inter=40)
    yield "multiple of 16", (*odd, F.silu)
    yield (
        "rank 12",
        (*_case(6, tokens=8, slots_used=[0], num_slots=1, experts=4, k=2, rank=12), F.silu),
    )


@pytest.mark.parametrize("reason,args", list(_unsupported_cases()))
def test_other_calls_fall_back_or_fail_when_forced(reason, args, monkeypatch):
    """Calls the kernel does not take run the reference under auto; MIXSERVE_KERNELS=cpu makes
    them an error that says why."""
    assert reason in cpu.why_not(*args)
    monkeypatch.setenv("MIXSERVE_KERNELS", "auto")
    got = moe_lora_ffn(*args)
    want = reference.moe_lora_ffn(*args)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    monkeypatch.setenv("MIXSERVE_KERNELS", "cpu")
    with pytest.raises(RuntimeError, match=reason):
        moe_lora_ffn(*args)


def test_out_of_range_indices_are_errors_not_reads():
    x, gate_up, rows, slots, weights, *experts = _case(
        2, tokens=8, slots_used=[0, 1], num_slots=2, experts=4, k=2, rank=8
    )
    with pytest.raises(RuntimeError, match="past the tables"):
        cpu.moe_lora_ffn(x, gate_up, rows, torch.full_like(slots, 2), weights, *experts)
    with pytest.raises(RuntimeError, match="reads token"):
        cpu.moe_lora_ffn(x, gate_up, rows + 8, slots, weights, *experts)
