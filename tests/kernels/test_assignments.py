"""build_segments / concat_segments against a per-entry Python loop and a stable sort."""

from __future__ import annotations

import pytest
import torch

from mixserve.kernels import Segments, build_segments, concat_segments

Assignment = tuple[int, int, float]  # (row id, group id, weight)


def naive_build(
    weights: torch.Tensor, row_ids: torch.Tensor, slot_ids: torch.Tensor, num_experts: int
) -> list[Assignment]:
    out = []
    for i in range(weights.shape[0]):
        for e in range(weights.shape[1]):
            w = float(weights[i, e])
            if w > 0:
                out.append((int(row_ids[i]), int(slot_ids[i]) * num_experts + e, w))
    # Python's sort is stable: ties stay in row order.
    return sorted(out, key=lambda a: a[1])


def as_list(seg: Segments) -> list[Assignment]:
    assert seg.row_ids.dtype == torch.int64
    assert seg.group_ids.dtype == torch.int64
    assert seg.weights.dtype == torch.float32
    n = seg.num_assignments
    assert seg.row_ids.shape == seg.group_ids.shape == seg.weights.shape == (n,)
    return list(
        zip(seg.row_ids.tolist(), seg.group_ids.tolist(), seg.weights.tolist(), strict=True)
    )


def make_segments(assignments: list[Assignment]) -> Segments:
    ordered = sorted(assignments, key=lambda a: a[1])
    return Segments(
        row_ids=torch.tensor([a[0] for a in ordered], dtype=torch.int64),
        group_ids=torch.tensor([a[1] for a in ordered], dtype=torch.int64),
        weights=torch.tensor([a[2] for a in ordered], dtype=torch.float32),
    )


def routing_matrix(num_rows: int, width: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """Positive weights at `density`; the rest zero or negative (neither is an assignment)."""
    w = torch.rand(num_rows, width, generator=gen) + 0.01
    on = torch.rand(num_rows, width, generator=gen) < density
    negative = torch.rand(num_rows, width, generator=gen) < 0.2
    return torch.where(on, w, torch.where(negative, -w, torch.zeros_like(w)))


@pytest.mark.parametrize(
    ("num_rows", "width", "num_experts", "num_slots", "density"),
    [
        (1, 1, 1, 1, 1.0),  # plain LoRA, one row
        (37, 4, 4, 3, 0.5),
        (200, 8, 8, 32, 0.3),
        (120, 3, 8, 5, 0.6),  # narrower weights than the stacked expert count
        (512, 16, 16, 7, 0.1),
    ],
)
def test_build_segments_matches_loop(num_rows, width, num_experts, num_slots, density):
    gen = torch.Generator().manual_seed(num_rows + width)
    weights = routing_matrix(num_rows, width, density, gen)
    # Routed rows are a subset of the batch, in batch order.
    row_ids = torch.sort(torch.randperm(3 * num_rows, generator=gen)[:num_rows]).values
    slot_ids = torch.randint(0, num_slots, (num_rows,), generator=gen)
    got = as_list(build_segments(weights, row_ids, slot_ids, num_experts))
    want = naive_build(weights, row_ids, slot_ids, num_experts)
    assert got == want
    assert len({g for _, g, _ in want}) > 1 or num_rows == 1
    # Several rows share a group, so the tie order is exercised.
    assert len(want) > len({g for _, g, _ in want}) or num_rows == 1


def test_ties_keep_the_order_of_the_input_rows():
    """Within a group assignments follow the rows of `weights`, whatever their row ids."""
    weights = torch.tensor([[0.5, 0.0], [0.2, 0.7], [0.1, 0.3], [0.0, 0.4]])
    row_ids = torch.tensor([9, 2, 7, 0])
    slot_ids = torch.tensor([1, 1, 1, 1])
    got = as_list(build_segments(weights, row_ids, slot_ids, 2))
    w = weights.tolist()
    expected = [
        (9, 2, w[0][0]),
        (2, 2, w[1][0]),
        (7, 2, w[2][0]),
        (2, 3, w[1][1]),
        (7, 3, w[2][1]),
        (0, 3, w[3][1]),
    ]
    assert got == expected


def test_no_positive_weight_gives_no_assignments():
    weights = torch.tensor([[0.0, -1.0], [-0.5, 0.0]])
    seg = build_segments(weights, torch.arange(2), torch.zeros(2, dtype=torch.int64), 2)
    assert as_list(seg) == []


def test_empty_batch():
    seg = build_segments(
        torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 4
    )
    assert seg.num_assignments == 0 and as_list(seg) == []


def random_assignments(
    count: int, num_groups: int, row_offset: int, gen: torch.Generator
) -> list[Assignment]:
    groups = torch.randint(0, num_groups, (count,), generator=gen).tolist()
    weights = (torch.rand(count, generator=gen) + 0.01).tolist()
    weights = [float(torch.tensor(w, dtype=torch.float32)) for w in weights]
    return [(row_offset + i, g, w) for i, (g, w) in enumerate(zip(groups, weights, strict=True))]


@pytest.mark.parametrize(("count_a", "count_b"), [(0, 0), (0, 5), (6, 0), (40, 25), (300, 1)])
def test_concat_segments_is_a_stable_merge(count_a, count_b):
    gen = torch.Generator().manual_seed(count_a * 31 + count_b)
    first = random_assignments(count_a, 12, 0, gen)
    second = random_assignments(count_b, 12, 1000, gen)
    got = as_list(concat_segments(make_segments(first), make_segments(second)))
    assert sorted(got) == sorted(first + second)
    groups = [g for _, g, _ in got]
    assert groups == sorted(groups)
    # Inside every group each input keeps its own order (its rows ascend here by construction).
    for source in (first, second):
        mine = {r for r, _, _ in source}
        for group in set(groups):
            rows = [r for r, g, _ in got if g == group and r in mine]
            assert rows == sorted(rows)


def test_memoised_builds_once_per_key_and_keeps_none():
    ids = torch.tensor([0, 1, 2])
    segments = Segments(ids, ids, torch.ones(3))
    calls: list[str] = []

    def build(key: str, value: object):
        return lambda: calls.append(key) or value

    assert segments.memoised("layout", build("layout", None)) is None
    assert segments.memoised("layout", build("layout", "other")) is None  # None is kept too
    assert segments.memoised("bags", build("bags", 7)) == 7
    assert segments.memoised("bags", build("bags", 8)) == 7
    assert calls == ["layout", "bags"]
    assert segments.subset(torch.tensor([0, 2])).memo == {}  # a subset starts empty
