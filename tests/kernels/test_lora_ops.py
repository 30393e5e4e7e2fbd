"""lora_shrink / lora_expand against per-assignment float64 loops over a grid of dtypes, ranks,
expert and slot counts, segment shapes and output layouts."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from support.lora_cases import DTYPES, TOL, Scenario, lora_stacks

from mixserve.kernels import Segments, _grouped, lora_apply, lora_expand, lora_shrink
from mixserve.kernels.lora import reference

# The torch reference's strategies through the wrappers (compiled CPU kernel: test_lora_cpu.py).
pytestmark = pytest.mark.usefixtures("reference_kernels")


SCENARIOS = {
    "plain_one_token": Scenario(1, 1, 1, 32, 16, 1),
    "few_slots": Scenario(100, 5, 4, 40, 24, 2),
    "unaligned_dims": Scenario(60, 3, 3, 6, 10, 2),
    "all_ranks": Scenario(256, 6, 4, 64, 48, 3),
    "many_slots_and_experts": Scenario(512, 32, 16, 64, 48, 4),
    "one_huge_segment": Scenario(512, 4, 8, 32, 16, 1, used_groups=(21,)),
    "mostly_empty_groups": Scenario(80, 32, 16, 32, 16, 1, used_groups=(3, 200, 511)),
    "no_assignments": Scenario(0, 4, 4, 32, 16, 1),
    # decode-like: a few rows per group, which lora_apply runs padded
    "decode_grid": Scenario(24, 8, 4, 32, 24, 1, used_groups=(0, 4, 8, 12, 16, 20, 24, 28)),
    "decode_irregular": Scenario(16, 8, 4, 32, 24, 1, used_groups=(1, 6, 13, 22, 30)),
}
# Half-precision CPU GEMMs cost a thread-pool round trip per group, which is slow on a loaded
# 2-core machine; the 512-group case runs in float32 only ("all_ranks" covers the rank mix).
CASES = [
    pytest.param(SCENARIOS[name], dtype.values[0], id=f"{name}-{dtype.id}")
    for name in SCENARIOS
    for dtype in DTYPES
    if name != "many_slots_and_experts" or dtype.id == "fp32"
]


@dataclass
class Batch:
    x: torch.Tensor  # [N, K]
    lora_a: torch.Tensor  # [G, R, K], rows >= the group's rank are zero
    lora_b: torch.Tensor  # [G, N_out, R], columns >= the group's rank are zero
    ranks: list[int]  # per group
    segments: Segments
    coef: torch.Tensor  # [P] float32


@functools.cache
def make_batch(sc: Scenario, dtype: torch.dtype, seed: int) -> Batch:
    """Shared between tests, which only read it."""
    gen = torch.Generator().manual_seed(seed)
    lora_a, lora_b, ranks = lora_stacks(sc, gen)

    assignments = []  # (row, group, weight)
    for row in range(sc.num_tokens):
        if sc.used_groups is not None:
            pick = int(torch.randint(0, len(sc.used_groups), (1,), generator=gen))
            groups = [sc.used_groups[pick]]
        else:
            slot = int(torch.randint(0, sc.num_slots, (1,), generator=gen))
            fanout = int(
                torch.randint(1, min(sc.max_fanout, sc.num_experts) + 1, (1,), generator=gen)
            )
            experts = torch.randperm(sc.num_experts, generator=gen)[:fanout].tolist()
            groups = [slot * sc.num_experts + e for e in experts]
        for g in groups:
            assignments.append((row, g, float(torch.rand(1, generator=gen)) + 0.05))
    assignments.sort(key=lambda a: a[1])
    segments = Segments(
        row_ids=torch.tensor([a[0] for a in assignments], dtype=torch.int64),
        group_ids=torch.tensor([a[1] for a in assignments], dtype=torch.int64),
        weights=torch.tensor([a[2] for a in assignments], dtype=torch.float32),
    )
    slot_scale = torch.rand(sc.num_slots, generator=gen) * 2 + 0.5
    coef = segments.weights * slot_scale[segments.group_ids // sc.num_experts]
    x = torch.randn(sc.num_tokens, sc.hidden, generator=gen)
    return Batch(x.to(dtype), lora_a.to(dtype), lora_b.to(dtype), ranks, segments, coef)


def naive_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, segments: Segments, gather: bool
) -> torch.Tensor:
    num = segments.num_assignments
    out = torch.zeros(num, lora_a.shape[1], dtype=torch.float64)
    for p in range(num):
        row = int(segments.row_ids[p]) if gather else p
        out[p] = x[row].double() @ lora_a[int(segments.group_ids[p])].double().T
    return out


def naive_expand(
    s: torch.Tensor,
    lora_b: torch.Tensor,
    segments: Segments,
    coef: torch.Tensor,
    out: torch.Tensor,
    scatter: bool,
) -> torch.Tensor:
    want = out.double().clone()
    for p in range(segments.num_assignments):
        row = int(segments.row_ids[p]) if scatter else p
        delta = s[p].double() @ lora_b[int(segments.group_ids[p])].double().T
        want[row] += float(coef[p]) * delta
    return want


def assert_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape
    tol = TOL[dtype]
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize(("scenario", "dtype"), CASES)
@pytest.mark.parametrize("gather_rows", [True, False])
def test_lora_shrink(scenario, dtype, gather_rows):
    batch = make_batch(scenario, dtype, seed=11)
    seg = batch.segments
    x = batch.x if gather_rows else batch.x[seg.row_ids]
    got = lora_shrink(x, batch.lora_a, seg, gather_rows=gather_rows)
    assert got.dtype == dtype
    assert_matches(got, naive_shrink(x, batch.lora_a, seg, gather_rows), dtype)
    # Zero-padded rank rows of A give exact zeros in the padded columns of s.
    for p in range(seg.num_assignments):
        rank = batch.ranks[int(seg.group_ids[p])]
        assert torch.all(got[p, rank:] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gather_rows", [True, False])
def test_lora_shrink_reads_a_strided_x(dtype, gather_rows):
    """x as a column slice of a wider activation (e.g. one part of a fused projection)."""
    batch = make_batch(SCENARIOS["few_slots"], dtype, seed=17)
    seg = batch.segments
    dense = batch.x if gather_rows else batch.x[seg.row_ids]
    wide = torch.zeros(dense.shape[0], dense.shape[1] + 12, dtype=dtype)
    wide[:, 4 : 4 + dense.shape[1]] = dense
    x = wide[:, 4 : 4 + dense.shape[1]]
    assert not x.is_contiguous()
    got = lora_shrink(x, batch.lora_a, seg, gather_rows=gather_rows)
    assert_matches(got, naive_shrink(dense, batch.lora_a, seg, gather_rows), dtype)


OUT_KINDS = ["zeros", "accumulate", "column_slice", "fp32_buffer"]


def make_out(kind: str, rows: int, cols: int, dtype: torch.dtype, gen: torch.Generator):
    """(out, its backing tensor): out may be a strided view into the backing tensor."""
    if kind == "zeros":
        backing = torch.zeros(rows, cols, dtype=dtype)
        return backing, backing
    if kind == "accumulate":
        backing = torch.randn(rows, cols, generator=gen).to(dtype)
        return backing, backing
    if kind == "column_slice":
        backing = torch.randn(rows, 3 * cols + 5, generator=gen).to(dtype)
        out = backing[:, cols + 3 : 2 * cols + 3]
        assert not out.is_contiguous() or rows <= 1
        return out, backing
    assert kind == "fp32_buffer"
    backing = torch.randn(rows, cols, generator=gen)
    return backing, backing


def check_expand(
    batch: Batch, dtype: torch.dtype, scatter_rows: bool, out_kind: str, num_tokens: int
) -> None:
    seg = batch.segments
    gen = torch.Generator().manual_seed(13)
    out_features = batch.lora_b.shape[1]
    # Padded rank columns of s hold garbage: the zero columns of B must cancel them.
    s = torch.randn(seg.num_assignments, batch.lora_b.shape[-1], generator=gen).to(dtype)
    rows = num_tokens if scatter_rows else seg.num_assignments
    out, backing = make_out(out_kind, rows, out_features, dtype, gen)
    before = backing.clone()
    want = naive_expand(s, batch.lora_b, seg, batch.coef, out, scatter_rows)

    assert lora_expand(s, batch.lora_b, seg, batch.coef, out, scatter_rows=scatter_rows) is None
    assert_matches(out, want, dtype)
    if out_kind == "column_slice":
        untouched = torch.ones_like(backing, dtype=torch.bool)
        untouched[:, out_features + 3 : 2 * out_features + 3] = False
        assert torch.equal(backing[untouched], before[untouched])
    if seg.num_assignments == 0:
        assert torch.equal(backing, before)


@pytest.mark.parametrize(("scenario", "dtype"), CASES)
@pytest.mark.parametrize("scatter_rows", [True, False])
def test_lora_expand_accumulates(scenario, dtype, scatter_rows):
    batch = make_batch(scenario, dtype, seed=12)
    check_expand(batch, dtype, scatter_rows, "accumulate", scenario.num_tokens)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_kind", OUT_KINDS)
@pytest.mark.parametrize("scatter_rows", [True, False])
def test_lora_expand_output_layouts(dtype, out_kind, scatter_rows):
    scenario = SCENARIOS["few_slots"]
    batch = make_batch(scenario, dtype, seed=16)
    check_expand(batch, dtype, scatter_rows, out_kind, scenario.num_tokens)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_without_assignments_are_left_alone(dtype):
    batch = make_batch(SCENARIOS["few_slots"], dtype, seed=14)
    seg = batch.segments
    keep = seg.row_ids % 3 != 0  # drop every assignment of every third row
    sub = Segments(seg.row_ids[keep], seg.group_ids[keep], seg.weights[keep])
    s = lora_shrink(batch.x, batch.lora_a, sub)
    out = torch.randn(batch.x.shape[0], SCENARIOS["few_slots"].out_features).to(dtype)
    before = out.clone()
    lora_expand(s, batch.lora_b, sub, batch.coef[keep], out)
    idle = torch.arange(out.shape[0]) % 3 == 0
    assert torch.equal(out[idle], before[idle])
    assert not torch.equal(out[~idle], before[~idle])


# lora_apply as it chooses ("apply_auto": row runs where rows are consecutive; for the rest,
# padded where its layout is tight, else bags), and bags or padded (wherever it can) forced for
# every row; "shrink_expand" is the two ops called one after the other. "_pool_b": B in the
# adapter pool's storage ([G, R, out] contiguous), which the bags read as a view.
WHOLE_DELTA_PATHS = [
    "shrink_expand",
    "apply_auto",
    "apply_bags",
    "apply_padded",
    "shrink_expand_pool_b",
    "apply_bags_pool_b",
]


def force_strategy(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """apply_bags: bags for every row; apply_padded: padded wherever padded_groups allows."""
    if path == "apply_auto":
        return
    monkeypatch.setattr(reference, "row_runs", lambda row_ids, group_ids: None)
    if path == "apply_bags":
        monkeypatch.setattr(reference, "padded_groups", lambda group_ids: None)
    else:
        monkeypatch.setattr(reference, "MAX_PADDED_PLACES_PER_ROW", float("inf"))


def apply_whole_delta(
    path: str, batch: Batch, out: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fresh Segments: the shared batch's memo must not carry a padded layout between tests.
    seg = Segments(batch.segments.row_ids, batch.segments.group_ids, batch.segments.weights)
    lora_b = batch.lora_b
    if path.endswith("_pool_b"):
        path, lora_b = path.removesuffix("_pool_b"), lora_b.mT.contiguous().mT
        assert lora_b.mT.is_contiguous() and torch.equal(lora_b, batch.lora_b)
    if path == "shrink_expand":
        lora_expand(lora_shrink(batch.x, batch.lora_a, seg), lora_b, seg, batch.coef, out)
        return
    force_strategy(path, monkeypatch)
    assert lora_apply(batch.x, batch.lora_a, lora_b, seg, batch.coef, out) is None


@pytest.mark.parametrize(("scenario", "dtype"), CASES)
@pytest.mark.parametrize("path", WHOLE_DELTA_PATHS)
def test_whole_delta_is_the_routed_lora_delta(scenario, dtype, path, monkeypatch):
    """y[r] += coef * B_g (A_g x[r]) summed over each row's assignments, end to end."""
    batch = make_batch(scenario, dtype, seed=15)
    seg = batch.segments
    out = torch.zeros(scenario.num_tokens, scenario.out_features, dtype=dtype)
    apply_whole_delta(path, batch, out, monkeypatch)

    want = torch.zeros(scenario.num_tokens, scenario.out_features, dtype=torch.float64)
    for p in range(seg.num_assignments):
        row, group = int(seg.row_ids[p]), int(seg.group_ids[p])
        rank = batch.ranks[group]
        a = batch.lora_a[group, :rank].double()
        b = batch.lora_b[group, :, :rank].double()
        want[row] += float(batch.coef[p]) * (b @ (a @ batch.x[row].double()))
    # Two roundings to dtype (s, then the output) on the half-precision path.
    assert_matches(out, want, dtype)


@pytest.mark.parametrize("name", ["few_slots", "decode_grid", "decode_irregular"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["apply_auto", "apply_bags", "apply_padded"])
def test_lora_apply_with_group_scale_equals_its_per_assignment_coef(name, dtype, path, monkeypatch):
    """coef None with a per-group scale (how the model calls it: the site's scale of the layer)
    is coef = weights * group_scale[group] on every strategy."""
    scenario = SCENARIOS[name]
    batch = make_batch(scenario, dtype, seed=23)
    num_groups = batch.lora_a.shape[0]
    group_scale = torch.rand(num_groups, generator=torch.Generator().manual_seed(24)) + 0.5
    coef = batch.segments.weights * group_scale[batch.segments.group_ids]
    force_strategy(path, monkeypatch)
    outs = []
    for per_assignment in (True, False):
        seg = Segments(batch.segments.row_ids, batch.segments.group_ids, batch.segments.weights)
        out = torch.zeros(scenario.num_tokens, scenario.out_features, dtype=dtype)
        if per_assignment:
            lora_apply(batch.x, batch.lora_a, batch.lora_b, seg, coef, out)
        else:
            lora_apply(batch.x, batch.lora_a, batch.lora_b, seg, None, out, group_scale=group_scale)
        outs.append(out)
    assert outs[0].abs().sum() > 0
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="coef or group_scale"):
        lora_apply(batch.x, batch.lora_a, batch.lora_b, batch.segments, None, outs[0])


@pytest.mark.parametrize("name", ["few_slots", "decode_irregular"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", WHOLE_DELTA_PATHS[1:])
def test_lora_apply_into_a_column_slice_touches_only_its_columns(name, dtype, path, monkeypatch):
    """q/k/v deltas land on column slices of the fused qkv output."""
    scenario = SCENARIOS[name]
    batch = make_batch(scenario, dtype, seed=18)
    gen = torch.Generator().manual_seed(19)
    out, backing = make_out("column_slice", scenario.num_tokens, scenario.out_features, dtype, gen)
    before = backing.clone()
    want = naive_expand(
        naive_shrink(batch.x, batch.lora_a, batch.segments, True),
        batch.lora_b,
        batch.segments,
        batch.coef,
        out,
        True,
    )
    apply_whole_delta(path, batch, out, monkeypatch)
    assert_matches(out, want, dtype)
    untouched = torch.ones_like(backing, dtype=torch.bool)
    untouched[:, scenario.out_features + 3 : 2 * scenario.out_features + 3] = False
    assert torch.equal(backing[untouched], before[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_kind", ["accumulate", "column_slice"])
def test_prefill_chunks_run_as_row_slices_and_the_rest_as_before(dtype, out_kind, monkeypatch):
    """A mixed step: two adapters' prefill chunks (consecutive rows of one group) plus decode
    rows of other groups and a short chunk. The chunks of at least MIN_RUN_ROWS rows run as
    GEMMs on row slices; the rest (one row per group here) take the bags; the sum is the routed
    LoRA delta."""
    sc = Scenario(1, 6, 4, 40, 24, 1)  # 6 slots x 4 experts, hidden 40, out 24, rank 16
    gen = torch.Generator().manual_seed(31)
    lora_a, lora_b, _ = lora_stacks(sc, gen)
    long_rows = _grouped.MIN_RUN_ROWS
    # rows: decode of slot 5, a chunk of slot 1, decode of slot 3, a chunk of slot 2, a short
    # chunk (4 rows) of slot 0, decode of slot 1 (its group again, not next to its chunk)
    row_groups = (
        [20] + [4] * long_rows + [12] + [8] * (long_rows + 3) + [0] * 4 + [4]
    )  # plain LoRA: group = slot * E
    num_rows = len(row_groups)
    groups = torch.tensor(row_groups)
    order = torch.argsort(groups, stable=True)
    seg = Segments(order, groups[order], torch.ones(num_rows))
    coef = torch.rand(num_rows, generator=gen) + 0.5
    x = torch.randn(num_rows, sc.hidden, generator=gen).to(dtype)
    lora_a, lora_b = lora_a.to(dtype), lora_b.mT.contiguous().mT.to(dtype)  # the pool's layout
    out, backing = make_out(out_kind, num_rows, sc.out_features, dtype, gen)
    want = naive_expand(naive_shrink(x, lora_a, seg, True), lora_b, seg, coef, out, True)
    runs = _grouped.row_runs(seg.row_ids, seg.group_ids)
    assert runs is not None
    assert [(lo, hi, g) for lo, hi, _, g in runs.runs] == [
        (1, 1 + long_rows, 4),
        (2 + long_rows, 5 + 2 * long_rows, 8),
    ]
    bag_rows: list[int] = []
    real_bags = reference._apply_bags

    def bags(*args: object) -> None:
        bag_rows.append(args[3].num_assignments)  # type: ignore[attr-defined]
        real_bags(*args)

    monkeypatch.setattr(reference, "_apply_bags", bags)
    lora_apply(x, lora_a, lora_b, seg, coef, out)
    assert_matches(out, want, dtype)
    assert bag_rows == [num_rows - (2 * long_rows + 3)]  # the rest: 7 rows


def test_dense_range_cost_rule():
    """segment_matmul's cost rule (routers): 32 rows over 8 groups (rank 16, 576 wide) are
    cheaper as one GEMM over the group range; 4096 rows over 64 groups are not."""
    flops = 2 * 16 * (576 + 576)
    assert _grouped.dense_range_is_cheaper(32, 8, 32, flops)
    assert not _grouped.dense_range_is_cheaper(4096, 64, 4096, flops)


def naive_delta(batch: Batch, seg: Segments, coef: torch.Tensor) -> torch.Tensor:
    """The routed LoRA delta of the batch's weights over rows gathered by seg (the oracle)."""
    s = naive_shrink(batch.x, batch.lora_a, seg, True)
    out = torch.zeros(len(batch.x), batch.lora_b.shape[1])
    return naive_expand(s, batch.lora_b, seg, coef, out, True)


# Decode rows over the slots' expert-0 groups 0, 4, 8, 12, 16 (plain LoRA: slot * E): two rows
# each (a tight padded layout: 1 place a row), or one adapter with 5 beside four with one (5
# groups x 5 places for 9 rows: past MAX_PADDED_PLACES_PER_ROW).
DECODE_GROUPS = {
    "tight": ([0, 0, 4, 4, 8, 8, 12, 12, 16, 16], "padded_groups"),
    "uneven": ([0, 4, 8, 8, 8, 8, 8, 12, 16], "RankBags"),
}


@pytest.mark.parametrize("name", list(DECODE_GROUPS))
def test_decode_rows_take_a_layout_built_once_per_segments(name, monkeypatch):
    """A step's plain-LoRA Segments serve every layer and site: the padded layout (even groups)
    or the bag indices (uneven ones) are built on the first lora_apply and reused, and the other
    strategy never runs."""
    group_list, built = DECODE_GROUPS[name]
    batch = make_batch(SCENARIOS["few_slots"], torch.float32, seed=21)
    group_ids = torch.tensor(group_list)
    count = len(group_list)
    gen = torch.Generator().manual_seed(22)
    seg = Segments(
        torch.randperm(count, generator=gen), group_ids, torch.rand(count, generator=gen) + 0.5
    )
    coef = seg.weights * 1.5
    calls: dict[str, int] = {"padded_groups": 0, "RankBags": 0}
    for attr in calls:
        real = getattr(reference, attr)

        def counting(*args: object, real=real, attr=attr) -> object:
            calls[attr] += 1
            return real(*args)

        monkeypatch.setattr(reference, attr, counting)
    want = naive_delta(batch, seg, coef)
    for _ in range(3):
        out = torch.zeros(len(batch.x), batch.lora_b.shape[1])
        lora_apply(batch.x, batch.lora_a, batch.lora_b, seg, coef, out)
        assert_matches(out, want, torch.float32)
    assert calls["padded_groups"] == 1  # asked once either way (the memo keeps a None too)
    assert calls["RankBags"] == (1 if built == "RankBags" else 0)


@pytest.mark.parametrize("scaled_groups", [False, True])
def test_a_popular_group_beside_small_ones(scaled_groups):
    """A decode step where one adapter has 11 rows and the others 1-2: the bags give the routed
    LoRA delta, with a per-assignment coef or a per-group scale."""
    batch = make_batch(SCENARIOS["few_slots"], torch.float32, seed=25)
    group_ids = torch.tensor([0] * 11 + [4, 8, 8, 12, 16, 16])
    gen = torch.Generator().manual_seed(26)
    seg = Segments(
        torch.randperm(17, generator=gen), group_ids, torch.rand(17, generator=gen) + 0.5
    )
    group_scale = torch.rand(batch.lora_a.shape[0], generator=gen) + 0.5
    coef = seg.weights * group_scale[group_ids]
    out = torch.zeros(len(batch.x), batch.lora_b.shape[1])
    if scaled_groups:
        lora_apply(batch.x, batch.lora_a, batch.lora_b, seg, None, out, group_scale=group_scale)
    else:
        lora_apply(batch.x, batch.lora_a, batch.lora_b, seg, coef, out)
    assert_matches(out, naive_delta(batch, seg, coef), torch.float32)
