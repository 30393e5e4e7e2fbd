"""Triton lora_shrink / lora_expand (and the fused gate+up pairs) against the torch reference.

The oracle is the reference op run in float32 on the CPU over the same (dtype-rounded) inputs;
segments come exact (reference-built) and padded (device-built, num_valid on the device).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from lora_triton_cases import (
    DEVICE,
    ON_GPU,
    SCENARIOS,
    Batch,
    assert_matches,
    cpu32,
    cpu_segments,
    make_batch,
)
from support.lora_cases import DTYPES, Scenario

from mixserve.kernels import (
    Segments,
    lora_expand,
    lora_expand_pair,
    lora_shrink,
    lora_shrink_pair,
)
from mixserve.kernels.lora import reference

# The interpreter is slow: on the CPU every scenario runs in fp32, a few in half precision too.
HALF_ON_CPU = ("few_slots", "all_ranks", "one_huge_segment", "mostly_empty_groups")
CASES = [
    pytest.param(name, dtype.values[0], id=f"{name}-{dtype.id}")
    for name in SCENARIOS
    for dtype in DTYPES
    if ON_GPU or dtype.id == "fp32" or name in HALF_ON_CPU
]
PADDED = [pytest.param(False, id="exact"), pytest.param(True, id="padded")]

# (padded segments, gather / scatter rows): per-assignment rows only with padded segments.
LAYOUTS = {
    "exact-rows": (False, True),
    "padded-rows": (True, True),
    "padded-per_row": (True, False),
}
# On the CPU the half-precision cases take the padded-rows layout only.
CASE_LAYOUTS = [
    pytest.param(*case.values, *LAYOUTS[layout], id=f"{case.id}-{layout}")
    for case in CASES
    for layout in LAYOUTS
    if ON_GPU or case.values[1] == torch.float32 or layout == "padded-rows"
]


def grid(keep_on_cpu, *axes: list) -> list:
    """Product of axes (lists of pytest.param); on the CPU only the combinations kept."""
    out = []
    for combo in itertools.product(*axes):
        values = [v for p in combo for v in p.values]
        if ON_GPU or keep_on_cpu(*values):
            out.append(pytest.param(*values, id="-".join(str(p.id) for p in combo)))
    return out


def params(*values, ids: list[str]) -> list:
    return [pytest.param(v, id=i) for v, i in zip(values, ids, strict=True)]


END_TO_END = [c for c in CASES if ON_GPU or c.values[1] == torch.float32 or "all_ranks" in c.id]


def want_shrink(x: torch.Tensor, a: torch.Tensor, seg: Segments, gather: bool) -> torch.Tensor:
    return reference.lora_shrink(cpu32(x), cpu32(a), cpu_segments(seg), gather_rows=gather)


def want_expand(
    s: torch.Tensor,
    b: torch.Tensor,
    seg: Segments,
    coef: torch.Tensor,
    out: torch.Tensor,
    scatter: bool,
) -> torch.Tensor:
    want = cpu32(out).clone()
    seg_cpu = cpu_segments(seg)
    reference.lora_expand(cpu32(s), cpu32(b), seg_cpu, coef.cpu(), want, scatter_rows=scatter)
    return want


def per_assignment_x(batch: Batch, seg: Segments) -> torch.Tensor:
    return batch.x.index_select(0, seg.row_ids)  # [P, K], padding rows are real rows


@pytest.mark.parametrize(("name", "dtype", "padded", "gather_rows"), CASE_LAYOUTS)
def test_shrink(name, dtype, padded, gather_rows):
    batch = make_batch(SCENARIOS[name], dtype, seed=11)
    seg = batch.segments(padded)
    x = batch.x if gather_rows else per_assignment_x(batch, seg)
    got = lora_shrink(x, batch.lora_a, seg, gather_rows=gather_rows)
    assert got.dtype == dtype and got.device.type == DEVICE.type
    assert_matches(got, want_shrink(x, batch.lora_a, seg, gather_rows), dtype)
    # Zero-padded rank rows give exact zeros; so do padding assignments.
    count = seg.num_assignments
    rank_of = batch.ranks.long()[seg.group_ids]  # [P]
    beyond = torch.arange(got.shape[1], device=got.device)[None, :] >= rank_of[:, None]
    beyond[count:] = True
    assert torch.all(got[beyond] == 0)


@pytest.mark.parametrize(("name", "dtype", "padded", "scatter_rows"), CASE_LAYOUTS)
def test_expand_accumulates(name, dtype, padded, scatter_rows):
    batch = make_batch(SCENARIOS[name], dtype, seed=12)
    seg = batch.segments(padded)
    gen = torch.Generator().manual_seed(13)
    num_rows = seg.row_ids.shape[0]
    # Padded rank columns of s hold garbage: the zero columns of B must cancel them.
    s = torch.randn(num_rows, batch.lora_b.shape[2], generator=gen).to(DEVICE, dtype)
    rows = batch.x.shape[0] if scatter_rows else num_rows
    out = torch.randn(rows, batch.lora_b.shape[1], generator=gen).to(DEVICE, dtype)
    coef = batch.coef(seg)
    want = want_expand(s, batch.lora_b, seg, coef, out, scatter_rows)
    before = out.clone()
    assert lora_expand(s, batch.lora_b, seg, coef, out, scatter_rows=scatter_rows) is None
    assert_matches(out, want, dtype)
    if not scatter_rows:  # padding rows of a per-assignment output are left alone
        assert torch.equal(out[seg.num_assignments :], before[seg.num_assignments :])


@pytest.mark.parametrize(
    ("dtype", "scatter_rows", "out_kind"),
    grid(
        lambda dtype, *_: dtype != torch.float16,
        DTYPES,
        params(True, False, ids=["scatter", "per_row"]),
        params("column_slice", "fp32_out", ids=["column_slice", "fp32_out"]),
    ),
)
def test_expand_output_layouts(dtype, scatter_rows, out_kind):
    batch = make_batch(SCENARIOS["few_slots"], dtype, seed=16)
    seg = batch.padded
    gen = torch.Generator().manual_seed(3)
    num_rows = seg.row_ids.shape[0]
    s = torch.randn(num_rows, batch.lora_b.shape[2], generator=gen).to(DEVICE, dtype)
    rows, width = (batch.x.shape[0] if scatter_rows else num_rows), batch.lora_b.shape[1]
    if out_kind == "column_slice":  # e.g. the up half of a fused gate_up output
        backing = torch.randn(rows, 3 * width + 5, generator=gen).to(DEVICE, dtype)
        out = backing[:, width + 3 : 2 * width + 3]
    else:  # float32 output for half-precision s: atomics go straight into it
        backing = out = torch.randn(rows, width, generator=gen).to(DEVICE)
    before = backing.clone()
    want = want_expand(s, batch.lora_b, seg, batch.coef(seg), out, scatter_rows)
    lora_expand(s, batch.lora_b, seg, batch.coef(seg), out, scatter_rows=scatter_rows)
    assert_matches(out, want, dtype)
    if out_kind == "column_slice":
        untouched = torch.ones_like(backing, dtype=torch.bool)
        untouched[:, width + 3 : 2 * width + 3] = False
        assert torch.equal(backing[untouched], before[untouched])


@pytest.mark.parametrize(
    ("dtype", "padded"),
    grid(lambda dtype, padded: padded or dtype != torch.float16, DTYPES, PADDED),
)
def test_group_ranks_skip_padded_rank_columns(dtype, padded):
    """With group_ranks, whatever lies past a group's rank in A, B or s is never read."""
    batch = make_batch(SCENARIOS["all_ranks"], dtype, seed=18)
    seg = batch.segments(padded)
    rank_cols = torch.arange(batch.lora_a.shape[1], device=DEVICE)
    beyond = rank_cols[None, :] >= batch.ranks[:, None]  # [G, R]
    junk_a = batch.lora_a + beyond[:, :, None].to(dtype) * 100
    junk_b = batch.lora_b + beyond[:, None, :].to(dtype) * 100
    got = lora_shrink(batch.x, junk_a, seg, group_ranks=batch.ranks)
    assert_matches(got, want_shrink(batch.x, batch.lora_a, seg, True), dtype)
    s = got + (rank_cols[None, :] >= batch.ranks.long()[seg.group_ids][:, None]).to(dtype) * 100
    out = torch.zeros(batch.x.shape[0], batch.lora_b.shape[1], dtype=dtype, device=DEVICE)
    want = want_expand(got, batch.lora_b, seg, batch.coef(seg), out, True)
    lora_expand(s, junk_b, seg, batch.coef(seg), out, group_ranks=batch.ranks)
    assert_matches(out, want, dtype)


@pytest.mark.parametrize(
    ("dtype", "name", "gather_rows"),
    grid(
        lambda dtype, name, gather: dtype == torch.float32 or (gather and name != "few_slots"),
        DTYPES,
        params("few_slots", "32_slots_16_experts", ids=["few_slots", "32_slots_16_experts"]),
        params(True, False, ids=["gather", "per_row"]),
    ),
)
def test_shrink_pair_is_two_shrinks(dtype, name, gather_rows):
    batch = make_batch(SCENARIOS[name], dtype, seed=19)
    seg = batch.padded
    x = batch.x if gather_rows else per_assignment_x(batch, seg)
    a2 = batch.lora_a.flip(0)  # another stack of the same shape (the up projection)
    s1, s2 = lora_shrink_pair(x, batch.lora_a, a2, seg, gather_rows=gather_rows)
    assert_matches(s1, want_shrink(x, batch.lora_a, seg, gather_rows), dtype)
    assert_matches(s2, want_shrink(x, a2, seg, gather_rows), dtype)


@pytest.mark.parametrize(
    ("dtype", "scatter_rows", "second_width"),
    grid(
        lambda dtype, scatter, width: dtype == torch.float32 or width is None,
        DTYPES,
        params(True, False, ids=["scatter", "per_row"]),
        params(None, 70, ids=["same_width", "other_width"]),
    ),
)
def test_expand_pair_is_two_expands(dtype, scatter_rows, second_width):
    """out1 / out2 as the two halves of one gate_up tensor (the MixLoRA FFN's use)."""
    batch = make_batch(SCENARIOS["few_slots"], dtype, seed=20)
    seg = batch.padded
    gen = torch.Generator().manual_seed(5)
    num_rows, rank = seg.row_ids.shape[0], batch.lora_b.shape[2]
    b2 = batch.lora_b.flip(0)
    if second_width is not None:
        b2 = torch.randn(b2.shape[0], second_width, rank, generator=gen).to(DEVICE, dtype)
    w1, w2 = batch.lora_b.shape[1], b2.shape[1]
    s1 = torch.randn(num_rows, rank, generator=gen).to(DEVICE, dtype)
    s2 = torch.randn(num_rows, rank, generator=gen).to(DEVICE, dtype)
    rows = batch.x.shape[0] if scatter_rows else num_rows
    gate_up = torch.randn(rows, w1 + w2, generator=gen).to(DEVICE, dtype)
    out1, out2 = gate_up[:, :w1], gate_up[:, w1:]
    coef1, coef2 = batch.coef(seg), batch.coef(seg) * 0.5
    want1 = want_expand(s1, batch.lora_b, seg, coef1, out1, scatter_rows)
    want2 = want_expand(s2, b2, seg, coef2, out2, scatter_rows)
    lora_expand_pair(
        s1, s2, batch.lora_b, b2, seg, coef1, coef2, out1, out2, scatter_rows=scatter_rows
    )
    assert_matches(out1, want1, dtype)
    assert_matches(out2, want2, dtype)


def test_pair_ops_fall_back_on_mismatched_shapes():
    """Stacks of different ranks cannot share one launch: two launches, same results."""
    dtype = torch.float32
    batch = make_batch(SCENARIOS["few_slots"], dtype, seed=21)
    seg = batch.padded
    a2 = batch.lora_a[:, :16].contiguous()
    s1, s2 = lora_shrink_pair(batch.x, batch.lora_a, a2, seg)
    assert s2.shape == (seg.row_ids.shape[0], 16)
    assert_matches(s2, want_shrink(batch.x, a2, seg, True), dtype)
    out1 = torch.zeros(batch.x.shape[0], batch.lora_b.shape[1], device=DEVICE)
    out2 = torch.zeros_like(out1)
    b2 = batch.lora_b[:, :, :16].contiguous()
    coef = batch.coef(seg)
    want1 = want_expand(s1, batch.lora_b, seg, coef, out1, True)
    want2 = want_expand(s2, b2, seg, coef, out2, True)
    lora_expand_pair(s1, s2, batch.lora_b, b2, seg, coef, coef, out1, out2)
    assert_matches(out1, want1, dtype)
    assert_matches(out2, want2, dtype)


@pytest.mark.parametrize(("name", "dtype"), END_TO_END)
def test_shrink_then_expand_is_the_routed_lora_delta(name, dtype):
    """y[r] += coef * B_g (A_g x[r]) over each row's assignments, end to end on padded segments."""
    batch = make_batch(SCENARIOS[name], dtype, seed=15)
    seg = batch.padded
    out = torch.zeros(batch.x.shape[0], batch.lora_b.shape[1], dtype=dtype, device=DEVICE)
    s = lora_shrink(batch.x, batch.lora_a, seg, group_ranks=batch.ranks)
    lora_expand(s, batch.lora_b, seg, batch.coef(seg), out, group_ranks=batch.ranks)
    exact = cpu_segments(batch.exact)
    want = torch.zeros(out.shape, dtype=torch.float64)
    x, a, b = cpu32(batch.x).double(), cpu32(batch.lora_a).double(), cpu32(batch.lora_b).double()
    coef = batch.coef(batch.exact).cpu().double()
    for group in torch.unique(exact.group_ids).tolist():
        sel = torch.nonzero(exact.group_ids == group, as_tuple=True)[0]
        rows = exact.row_ids[sel]
        delta = (x[rows] @ a[group].T) @ b[group].T * coef[sel, None]
        want.index_add_(0, rows, delta)
    # Two roundings to dtype (s, then the output) on the half-precision path.
    assert_matches(out, want.float(), dtype)


def test_wrappers_dispatch(monkeypatch):
    """`reference` forces the torch ops (padded segments included); `triton` the kernels."""
    from mixserve.kernels.lora import triton as device

    batch = make_batch(SCENARIOS["few_slots"], torch.float32, seed=22)
    seg = batch.padded
    want = want_shrink(batch.x, batch.lora_a, seg, True)
    monkeypatch.setenv("MIXSERVE_KERNELS", "reference")
    monkeypatch.setattr(device, "lora_shrink", None)  # would fail if called
    assert_matches(lora_shrink(batch.x, batch.lora_a, seg), want, torch.float32)
    monkeypatch.undo()
    monkeypatch.setenv("MIXSERVE_KERNELS", "triton")
    calls = []
    real = device.lora_shrink
    monkeypatch.setattr(device, "lora_shrink", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert_matches(lora_shrink(batch.x, batch.lora_a, seg), want, torch.float32)
    assert calls == [1]


@pytest.mark.parametrize(
    ("dtype", "split", "pair"),
    grid(
        lambda dtype, split, pair: split == 4,
        DTYPES[:2],
        params(2, 4, ids=["split2", "split4"]),
        params(False, True, ids=["single", "pair"]),
    ),
)
def test_shrink_split_k(monkeypatch, dtype, split, pair):
    """Decode-sized batches slice K over programs and add float32 partial sums atomically."""
    from mixserve.kernels.lora import triton as device

    monkeypatch.setattr(device, "_split_k", lambda *_: split)
    batch = make_batch(Scenario(30, 4, 4, 200, 24, 2), dtype, seed=23)  # K = 200: a ragged tail
    seg = batch.padded
    if pair:
        a2 = batch.lora_a.roll(1, dims=2)  # other values, the same zero-padded ranks
        got = lora_shrink_pair(batch.x, batch.lora_a, a2, seg, group_ranks=batch.ranks)
        assert_matches(got[1], want_shrink(batch.x, a2, seg, True), dtype)
        got = got[0]
    else:
        got = lora_shrink(batch.x, batch.lora_a, seg, group_ranks=batch.ranks)
    assert got.dtype == dtype
    assert_matches(got, want_shrink(batch.x, batch.lora_a, seg, True), dtype)
    assert torch.all(got[seg.num_assignments :] == 0)
