"""moe_lora_ffn (MixLoRA whole-FFN experts): each shrink (input-row bags, grouped GEMMs) and
both A layouts vs a float64 per-row loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.moe_cases import moe_case as _case
from support.moe_cases import naive_moe as _naive

from mixserve.kernels import moe_lora_ffn
from mixserve.kernels.moe_lora_ffn import reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("shrink", ["bags", "grouped", "auto"])
@pytest.mark.parametrize("pool_layout", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("tokens", "slots_used", "experts", "k", "one_slot"),
    [
        (1, [2], 4, 1, False),  # a single row
        (9, [0, 3], 8, 2, False),  # decode-like: few rows per slot
        (64, [1, 2, 5], 6, 3, False),  # uneven slots, gaps in the slot range
        (120, [4], 8, 2, True),  # one huge slot
        (40, [0, 1, 2, 3, 4, 5], 16, 4, False),  # 16 experts
    ],
)
def test_matches_per_row_loop(shrink, pool_layout, dtype, tokens, slots_used, experts, k, one_slot):
    case = _case(
        7 + tokens,
        tokens=tokens,
        slots_used=slots_used,
        num_slots=6,
        experts=experts,
        k=k,
        dtype=dtype,
        one_slot=one_slot,
        pool_layout=pool_layout,
    )
    hidden, delta = reference.moe_lora_ffn(*case, F.silu, shrink=shrink)
    want_hidden, want_delta = _naive(*case)
    scale = max(float(want_hidden.abs().max()), 1e-6)
    assert float((hidden.double() - want_hidden).abs().max()) / scale < TOL[dtype]
    scale = max(float(want_delta.abs().max()), 1e-6)
    assert float((delta.double() - want_delta).abs().max()) / scale < TOL[dtype]


def test_joint_gate_up_a_only_for_the_two_halves_of_one_storage():
    storage = torch.randn(3, 4, 10, 2, 8)  # [S, E, in, 2, R]
    gate, up = storage[..., 0, :].mT, storage[..., 1, :].mT
    joint = reference.joint_lora_a(gate, up)
    assert joint is not None and joint.shape == (12, 16, 10)
    assert torch.equal(joint[:, :8], gate.flatten(0, 1))
    assert torch.equal(joint[:, 8:], up.flatten(0, 1))
    assert reference.joint_lora_a(up, gate) is None  # the halves the other way round
    assert reference.joint_lora_a(gate, gate.contiguous()) is None  # separate tensors
    assert reference.joint_lora_a(gate.contiguous(), up.contiguous()) is None


def test_shrinks_agree_and_wrapper_dispatches():
    case = _case(
        3, tokens=32, slots_used=[0, 2, 4], num_slots=6, experts=8, k=2, dtype=torch.float32
    )
    bags = reference.moe_lora_ffn(*case, F.silu, shrink="bags")
    grouped = reference.moe_lora_ffn(*case, F.silu, shrink="grouped")
    public = moe_lora_ffn(*case, F.silu)
    for a, b, c in zip(bags, grouped, public, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_empty_rows_and_bad_shrink():
    case = list(
        _case(1, tokens=4, slots_used=[0], num_slots=2, experts=2, k=1, dtype=torch.float32)
    )
    case[2], case[3], case[4] = case[2][:0], case[3][:0], case[4][:0]
    hidden, delta = moe_lora_ffn(*case, F.silu)
    assert hidden.shape == (0, 40) and delta.shape == (0, 24)
    with pytest.raises(ValueError, match="shrink"):
        reference.moe_lora_ffn(*case, F.silu, shrink="fast")


def test_reference_stays_torch_when_triton_is_forced(monkeypatch):
    """The reference is the oracle of the Triton tests, which force MIXSERVE_KERNELS=triton: it
    must call its sub-ops' references, not their dispatching wrappers. Without the interpreter,
    a dispatched sub-op on CPU tensors would raise instead of computing."""
    case = _case(5, tokens=12, slots_used=[0, 1], num_slots=2, experts=4, k=2, dtype=torch.float32)
    expected = reference.moe_lora_ffn(*case, F.silu, shrink="grouped")
    monkeypatch.setenv("MIXSERVE_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for shrink in ("bags", "grouped"):
        got = reference.moe_lora_ffn(*case, F.silu, shrink=shrink)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shrink", ["bags", "grouped", "auto"])
def test_rows_without_selected_experts_get_zeros(shrink):
    """A row whose every weight is 0 (or a step where no row selects anything) adds nothing."""
    case = list(
        _case(11, tokens=10, slots_used=[0, 1], num_slots=2, experts=4, k=2, dtype=torch.float32)
    )
    case[4][::2] = 0  # every other row selects nothing
    hidden, delta = reference.moe_lora_ffn(*case, F.silu, shrink=shrink)
    want_hidden, want_delta = _naive(*case)
    torch.testing.assert_close(hidden.double(), want_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta.double(), want_delta, rtol=1e-5, atol=1e-6)
    assert not hidden[::2].any() and not delta[::2].any()
    case[4].zero_()
    hidden, delta = reference.moe_lora_ffn(*case, F.silu, shrink=shrink)
    assert hidden.shape == (len(case[2]), 40) and not hidden.any() and not delta.any()


@pytest.mark.parametrize(
    ("counts", "want"),
    [
        ([1] * 12, "bags"),  # decode: one row per adapter, top-2 of 8: ~1 pair per group
        ([3] * 6, "bags"),  # a few rows per adapter: at most 6 pairs per used group
        # One adapter's prefill chunk, top-2 of 8: count / 4 pairs in each of the 8 groups.
        ([4 * reference.MAX_BAG_ASSIGNMENTS_PER_GROUP], "bags"),  # at the limit
        ([4 * reference.MAX_BAG_ASSIGNMENTS_PER_GROUP + 4], "grouped"),  # one pair past it
    ],
)
def test_auto_shrink_by_pairs_per_group(counts, want, monkeypatch):
    """auto takes bags while the used groups average at most MAX_BAG_ASSIGNMENTS_PER_GROUP
    pairs, grouped GEMMs past that."""
    tokens = sum(counts)
    case = list(
        _case(17, tokens=tokens, slots_used=[0], num_slots=12, experts=8, k=2, dtype=torch.float32)
    )
    case[2] = torch.arange(tokens)
    case[3] = torch.tensor([s for s, c in enumerate(counts) for _ in range(c)])
    case[4] = torch.zeros(tokens, 8).scatter_(
        1, torch.stack([torch.arange(tokens) % 8, (torch.arange(tokens) + 3) % 8], 1), 0.5
    )
    calls: list[str] = []
    real_bag, real_grouped = reference.bag_shrink, reference.lora_shrink
    monkeypatch.setattr(
        reference, "bag_shrink", lambda *a, **k: calls.append("bags") or real_bag(*a, **k)
    )
    monkeypatch.setattr(
        reference, "lora_shrink", lambda *a, **k: calls.append("grouped") or real_grouped(*a, **k)
    )
    got = reference.moe_lora_ffn(*case, F.silu)
    assert calls == [want] * 2  # gate and up in one (their A share storage), then down
    want_hidden, want_delta = _naive(*case)
    torch.testing.assert_close(got[0].double(), want_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].double(), want_delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shrink", ["bags", "grouped"])
@pytest.mark.parametrize("rows_in_order", [True, False])
def test_rows_with_different_numbers_of_experts(shrink, rows_in_order):
    """Top-p and DynMoLE routing select 1 .. E experts per row: the pairs of each row are
    gathered and summed by row rather than as a [N, k] view."""
    case = list(
        _case(13, tokens=30, slots_used=[0, 2, 3], num_slots=4, experts=6, k=2, dtype=torch.float32)
    )
    gen = torch.Generator().manual_seed(5)
    num_rows = len(case[2])
    if rows_in_order:
        case[2] = torch.arange(num_rows)
        case[1] = case[1][:num_rows]
        case[0] = case[0][:num_rows]
    keep = torch.rand(num_rows, 6, generator=gen) < torch.linspace(0.1, 0.9, num_rows)[:, None]
    keep[:, 0] |= ~keep.any(1)  # every row at least one expert
    case[4] = torch.rand(num_rows, 6, generator=gen) * keep
    assert len(set((case[4] > 0).sum(1).tolist())) > 2
    hidden, delta = reference.moe_lora_ffn(*case, F.silu, shrink=shrink)
    want_hidden, want_delta = _naive(*case)
    torch.testing.assert_close(hidden.double(), want_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta.double(), want_delta, rtol=1e-5, atol=1e-6)


def test_fixed_k_over_every_row_gathers_no_base_rows(monkeypatch):
    """Every token routed with the same k: the base projections broadcast onto the pairs, so
    gate_up is never gathered (the [P, 2I] copy that sorted pairs paid)."""
    case = list(
        _case(19, tokens=16, slots_used=[0, 1], num_slots=2, experts=4, k=2, dtype=torch.float32)
    )
    case[2] = torch.arange(16)
    case[3] = torch.tensor([0] * 8 + [1] * 8)
    case[4] = torch.zeros(16, 4).scatter_(
        1, torch.stack([torch.arange(16) % 4, (torch.arange(16) + 1) % 4], 1), 0.5
    )
    gate_up = case[1]
    gathered: list[torch.Tensor] = []
    real_index_select = torch.Tensor.index_select

    def spy(self, dim, index):
        if self is gate_up or self.data_ptr() == gate_up.data_ptr():
            gathered.append(index)
        return real_index_select(self, dim, index)

    monkeypatch.setattr(torch.Tensor, "index_select", spy)
    hidden, delta = reference.moe_lora_ffn(*case, F.silu, shrink="bags")
    monkeypatch.undo()
    assert gathered == []
    want_hidden, want_delta = _naive(*case)
    torch.testing.assert_close(hidden.double(), want_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(delta.double(), want_delta, rtol=1e-5, atol=1e-6)
