"""grouped_matmul / segment_matmul against per-row float64 matmuls, on each of its paths: the
padded batched GEMM (few, similar rows per group), grouped_mm, and the per-group loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixserve.kernels import _grouped
from mixserve.kernels._grouped import grouped_matmul, places_in_groups, segment_matmul

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


def naive(a: torch.Tensor, b: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(a.shape[0], b.shape[-1], dtype=torch.float64)
    for p in range(a.shape[0]):
        out[p] = a[p].double() @ b[int(group_ids[p])].double()
    return out


def assert_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    assert got.shape == want.shape
    tol = TOL[dtype]
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy whose data pointer is off the 16-byte grid."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16
    return out


@pytest.fixture
def grouped_mm_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls into F.grouped_mm, to tell which path a case took."""
    calls: list[int] = []
    if not _grouped._HAS_GROUPED_MM:
        return calls
    real = F.grouped_mm

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_grouped.F, "grouped_mm", spy)
    return calls


@pytest.fixture
def padded_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls into the padded batched-GEMM path."""
    calls: list[int] = []
    real = _grouped._padded_bmm

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_grouped, "_padded_bmm", spy)
    return calls


def skewed_ids(rows_per_group: dict[int, int]) -> torch.Tensor:
    """Sorted group ids with these row counts: one big group keeps the padded path away."""
    return torch.cat([torch.full((n,), g, dtype=torch.int64) for g, n in rows_per_group.items()])


def sorted_ids(num_rows: int, groups: list[int], gen: torch.Generator) -> torch.Tensor:
    choice = torch.randint(0, len(groups), (num_rows,), generator=gen)
    return torch.sort(torch.tensor(groups)[choice]).values


def weights_in_layout(
    layout: str, shape: tuple[int, int, int], dtype: torch.dtype, gen: torch.Generator
) -> torch.Tensor:
    """A [G, K, N] weight in dtype with the given memory layout."""
    g, k, n = shape
    if layout == "contiguous":
        return torch.randn(g, k, n, generator=gen).to(dtype)
    if layout == "transposed":
        return torch.randn(g, n, k, generator=gen).to(dtype).transpose(1, 2)
    if layout == "column_slice":
        return torch.randn(g, k, n + 16, generator=gen).to(dtype)[:, :, 8 : 8 + n]
    if layout == "misaligned_pointer":
        return misaligned(torch.randn(g, k, n, generator=gen).to(dtype))
    raise ValueError(layout)


# (layout, K, N, takes the grouped_mm path)
LAYOUTS = [
    ("contiguous", 16, 24, True),
    ("transposed", 16, 24, True),
    ("column_slice", 16, 24, True),
    ("contiguous", 6, 24, False),  # a's row stride is 12 or 24 bytes
    ("contiguous", 16, 6, False),  # b's row stride is 12 or 24 bytes
    ("transposed", 6, 24, False),
    ("misaligned_pointer", 16, 24, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("layout", "k", "n", "fast"), LAYOUTS)
def test_grouped_matmul_matches_per_row_loop(grouped_mm_calls, dtype, layout, k, n, fast):
    gen = torch.Generator().manual_seed(1)
    b = weights_in_layout(layout, (9, k, n), dtype, gen)
    a = torch.randn(70, k, generator=gen).to(dtype)
    ids = skewed_ids({1: 40, 2: 10, 4: 10, 5: 5, 8: 5})
    got = grouped_matmul(a, b, ids)
    assert_matches(got, naive(a, b, ids), dtype)
    assert bool(grouped_mm_calls) == (fast and _grouped._HAS_GROUPED_MM)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_path_and_loop_compute_the_same_function(grouped_mm_calls, dtype):
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(200, 32, generator=gen).to(dtype)
    b = torch.randn(12, 32, 40, generator=gen).to(dtype)
    ids = skewed_ids({0: 120, 3: 40, 4: 20, 7: 10, 11: 10})
    fast = grouped_matmul(a, b, ids)
    assert bool(grouped_mm_calls) == _grouped._HAS_GROUPED_MM
    grouped_mm_calls.clear()
    loop = grouped_matmul(misaligned(a), misaligned(b), ids)
    assert not grouped_mm_calls
    want = naive(a, b, ids)
    assert_matches(fast, want, dtype)
    assert_matches(loop, want, dtype)
    assert_matches(fast, loop.double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_huge_group(dtype):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(1500, 16, generator=gen).to(dtype)
    b = torch.randn(8, 16, 8, generator=gen).to(dtype)
    ids = torch.full((1500,), 5, dtype=torch.int64)
    assert_matches(grouped_matmul(a, b, ids), naive(a, b, ids), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_empty_groups_take_the_loop(grouped_mm_calls, dtype):
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(40, 16, generator=gen).to(dtype)
    b = torch.randn(300, 16, 8, generator=gen).to(dtype)
    ids = skewed_ids({2: 36, 150: 2, 299: 2})
    assert_matches(grouped_matmul(a, b, ids), naive(a, b, ids), dtype)
    assert not grouped_mm_calls


def test_sparse_but_not_mostly_empty_groups_take_grouped_mm(grouped_mm_calls):
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(64, 16, generator=gen)
    b = torch.randn(64, 16, 8, generator=gen)
    # 4 used groups spread over a range of 20, starting away from 0, with empty groups between.
    ids = skewed_ids({40: 40, 47: 8, 52: 8, 59: 8})
    assert_matches(grouped_matmul(a, b, ids), naive(a, b, ids), torch.float32)
    assert bool(grouped_mm_calls) == _grouped._HAS_GROUPED_MM


# (rows per group, weight layout): equal full groups over the whole range (a reshaped in place),
# uneven groups with empty ones between (rows scattered into padding, the grid's weights a
# strided view), irregular group ids whose grid would be mostly empty (the used groups' weights
# gathered).
PADDED_CASES = {
    "equal_full_range": ({0: 4, 1: 4, 2: 4, 3: 4}, "contiguous"),
    "equal_transposed_b": ({3: 2, 4: 2, 5: 2}, "transposed"),
    "uneven_with_gaps": ({1: 3, 4: 5, 5: 1, 9: 4}, "contiguous"),
    "uneven_column_slice_b": ({0: 2, 2: 6, 3: 3}, "column_slice"),
    "one_row_each": (dict.fromkeys(range(0, 12, 2), 1), "transposed"),
    "irregular_ids_gathered": ({0: 2, 7: 2, 19: 1, 40: 2}, "transposed"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(PADDED_CASES))
def test_padded_path_matches_per_row_loop(padded_calls, grouped_mm_calls, case, dtype):
    rows_per_group, layout = PADDED_CASES[case]
    gen = torch.Generator().manual_seed(10)
    ids = skewed_ids(rows_per_group)
    b = weights_in_layout(layout, (48, 16, 24), dtype, gen)
    a = torch.randn(ids.shape[0], 16, generator=gen).to(dtype)
    assert_matches(grouped_matmul(a, b, ids), naive(a, b, ids), dtype)
    assert padded_calls and not grouped_mm_calls
    # A strided a (a column slice) gives the same rows.
    wide = torch.randn(ids.shape[0], 40, generator=gen).to(dtype)
    wide[:, 8:24] = a
    assert_matches(grouped_matmul(wide[:, 8:24], b, ids), naive(a, b, ids), dtype)


def test_groups_of_many_rows_take_grouped_mm_not_padding(padded_calls, grouped_mm_calls):
    """Padding would waste little here, but groups past 8 rows cost more to pad and gather back
    than grouped_mm's per-group calls (a prefill's experts)."""
    gen = torch.Generator().manual_seed(11)
    ids = skewed_ids({0: 12, 1: 12, 2: 10, 3: 11})
    a = torch.randn(ids.shape[0], 16, generator=gen)
    b = torch.randn(4, 16, 24, generator=gen)
    assert_matches(grouped_matmul(a, b, ids), naive(a, b, ids), torch.float32)
    assert not padded_calls
    assert bool(grouped_mm_calls) == _grouped._HAS_GROUPED_MM


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["column_major", "column_slice"])
def test_strided_a(dtype, layout):
    gen = torch.Generator().manual_seed(9)
    if layout == "column_major":
        a = torch.randn(16, 64, generator=gen).to(dtype).t()  # [64, 16], stride (1, 64)
    else:
        a = torch.randn(64, 48, generator=gen).to(dtype)[:, 8:24]
    b = torch.randn(6, 16, 24, generator=gen).to(dtype)
    ids = sorted_ids(64, [0, 2, 5], gen)
    assert_matches(grouped_matmul(a, b, ids), naive(a, b, ids), dtype)


def test_mixed_dtypes_return_a_dtype():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(30, 16, generator=gen).to(torch.bfloat16)
    b = torch.randn(4, 16, 8, generator=gen)
    ids = sorted_ids(30, [0, 1, 3], gen)
    assert_matches(grouped_matmul(a, b, ids), naive(a, b, ids), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_input(dtype):
    a = torch.zeros(0, 16, dtype=dtype)
    b = torch.randn(3, 16, 5).to(dtype)
    ids = torch.zeros(0, dtype=torch.int64)
    for got in (grouped_matmul(a, b, ids), segment_matmul(a, b, ids)):
        assert got.shape == (0, 5) and got.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("k", "n"), [(16, 24), (6, 10)])
@pytest.mark.parametrize("way", ["gathered", "dense_range", "segmented"])
def test_segment_matmul_with_unsorted_group_ids(dtype, k, n, way, monkeypatch):
    """Every way segment_matmul may take: each row's weights gathered, one GEMM over the group
    range, or sorted segments."""
    monkeypatch.setattr(_grouped, "gathered_is_cheaper", lambda *args: way == "gathered")
    monkeypatch.setattr(_grouped, "dense_range_is_cheaper", lambda *args: way == "dense_range")
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(150, k, generator=gen).to(dtype)
    b = torch.randn(10, n, k, generator=gen).to(dtype).transpose(1, 2)
    ids = torch.randint(2, 10, (150,), generator=gen)  # a range that does not start at 0
    assert not torch.all(ids[1:] >= ids[:-1])
    assert_matches(segment_matmul(x, b, ids), naive(x, b, ids), dtype)


def test_few_rows_over_a_wide_range_take_the_gathered_way():
    """A decode step's router: 64 rows over a 64-slot range, [4, 576] weights a slot."""
    assert _grouped.gathered_is_cheaper(64, 64, 576, 4)
    assert not _grouped.gathered_is_cheaper(64, 16, 576, 4)  # a narrow range: one GEMM
    assert not _grouped.gathered_is_cheaper(1024, 64, 576, 4)  # many rows: segments


def test_segment_matmul_single_row_and_single_group():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 16, generator=gen)
    b = torch.randn(1, 16, 4, generator=gen)
    ids = torch.zeros(1, dtype=torch.int64)
    assert_matches(segment_matmul(x, b, ids), naive(x, b, ids), torch.float32)


def padded_layout(sorted_group_ids: torch.Tensor) -> _grouped.PaddedGroups | None:
    """grouped_matmul's padded layout of rows in these groups."""
    group_lo = int(sorted_group_ids[0])
    counts = torch.bincount(sorted_group_ids - group_lo)
    return _grouped._padded_from_counts(sorted_group_ids, group_lo, counts)


def test_padded_layout_is_a_strided_grid_or_the_used_groups():
    """Evenly spaced groups (plain LoRA: slot * E) pad over their grid and read the weights as a
    view; irregular ones (routed experts) pad only the groups that have rows."""
    grid = padded_layout(skewed_ids({4: 2, 8: 1, 16: 3}))
    assert grid is not None and grid.used_group_ids is None
    assert (grid.group_lo, grid.group_step, grid.num_groups, grid.max_rows) == (4, 4, 4, 3)
    b = torch.arange(48.0).view(48, 1, 1)
    assert grid.groups_of(b).flatten().tolist() == [4.0, 8.0, 12.0, 16.0]
    used = padded_layout(skewed_ids({0: 2, 7: 2, 19: 1, 40: 2}))
    assert used is not None and used.num_groups == 4
    assert used.groups_of(b).flatten().tolist() == [0.0, 7.0, 19.0, 40.0]
    assert padded_layout(skewed_ids({0: 9})) is None  # past the rows limit


def test_places_in_groups_counts_each_group_from_zero_in_item_order():
    gen = torch.Generator().manual_seed(0)
    group_of = torch.randint(0, 5, (40,), generator=gen).sort().values
    places = places_in_groups(group_of, torch.bincount(group_of, minlength=5))
    seen: dict[int, int] = {}
    for group, place in zip(group_of.tolist(), places.tolist(), strict=True):
        assert place == seen.get(group, 0)
        seen[group] = place + 1


def test_row_runs_finds_consecutive_rows_of_one_group_and_leaves_the_rest():
    # group 0: rows 3..7 (a run of 5), then row 9; group 2: rows 0, 1; group 5: rows 10..13
    # then 14..15 would continue it, but row 20 breaks it.
    row_ids = torch.tensor([3, 4, 5, 6, 7, 9, 0, 1, 10, 11, 12, 13, 14, 20])
    group_ids = torch.tensor([0, 0, 0, 0, 0, 0, 2, 2, 5, 5, 5, 5, 5, 5])
    runs = _grouped.row_runs(row_ids, group_ids, min_rows=4)
    assert runs is not None
    # (row_lo, row_hi, first assignment, group)
    assert runs.runs == ((3, 8, 0, 0), (10, 15, 8, 5))
    assert runs.rest is not None and runs.rest.tolist() == [5, 6, 7, 13]
    every = _grouped.row_runs(row_ids[:5], group_ids[:5], min_rows=5)
    assert every is not None and every.runs == ((3, 8, 0, 0),) and every.rest is None
    assert _grouped.row_runs(row_ids, group_ids, min_rows=6) is None
    assert _grouped.row_runs(row_ids[:3], group_ids[:3], min_rows=4) is None
