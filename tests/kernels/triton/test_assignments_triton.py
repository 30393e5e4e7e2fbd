"""Device-side build_segments / concat_segments against the reference: the valid prefix equals the
reference's exact-size result, the padding is inert (weight 0, in-range ids, sorted)."""

from __future__ import annotations

import pytest
import torch
from lora_triton_cases import DEVICE, ON_GPU

from mixserve.kernels import Segments, build_segments, concat_segments
from mixserve.kernels.assignments import reference

GRID = [  # (num_rows, width, num_experts, num_slots, density)
    (1, 1, 1, 1, 1.0),  # plain LoRA, one row
    (0, 4, 4, 3, 0.5),  # no rows
    (37, 4, 4, 3, 0.5),
    (200, 8, 8, 32, 0.3),
    (120, 3, 8, 5, 0.6),  # narrower weights than the stacked expert count
    (512, 16, 16, 7, 0.1),
    (300, 1, 1, 1, 1.0),  # one huge segment
    (50, 4, 4, 2, 0.0),  # every weight zero or negative
]
if ON_GPU:
    GRID += [(2048, 16, 16, 32, 0.25), (2048, 2, 2, 1, 1.0)]


def routing_matrix(num_rows: int, width: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """Positive weights at `density`; the rest zero or negative (neither is an assignment)."""
    w = torch.rand(num_rows, width, generator=gen) + 0.01
    on = torch.rand(num_rows, width, generator=gen) < density
    negative = torch.rand(num_rows, width, generator=gen) < 0.2
    return torch.where(on, w, torch.where(negative, -w, torch.zeros_like(w)))


def check_padded(got: Segments, want: Segments, size: int) -> None:
    """got: device-built with P = size; want: the exact reference result."""
    assert got.num_valid is not None and got.num_valid.dim() == 0
    assert got.num_valid.device == got.row_ids.device
    assert got.row_ids.shape == got.group_ids.shape == got.weights.shape == (size,)
    assert got.row_ids.dtype == got.group_ids.dtype == torch.int64
    assert got.weights.dtype == torch.float32
    count = got.num_assignments
    assert count == want.row_ids.shape[0]
    for name in ("row_ids", "group_ids", "weights"):
        assert torch.equal(getattr(got, name)[:count].cpu(), getattr(want, name).cpu()), name
    groups = got.group_ids.cpu()
    assert torch.all(groups[1:] >= groups[:-1])  # padding included
    last = int(groups[count - 1]) if count else 0
    assert torch.all(groups[count:] == last)
    assert torch.all(got.weights[count:] == 0)
    trimmed = got.trimmed()
    assert trimmed.num_valid is None and trimmed.row_ids.shape == (count,)


@pytest.mark.parametrize(("num_rows", "width", "num_experts", "num_slots", "density"), GRID)
def test_build_segments_matches_reference(num_rows, width, num_experts, num_slots, density):
    gen = torch.Generator().manual_seed(num_rows + width)
    weights = routing_matrix(num_rows, width, density, gen)
    row_ids = torch.sort(torch.randperm(3 * num_rows + 1, generator=gen)[:num_rows]).values
    slot_ids = torch.randint(0, num_slots, (num_rows,), generator=gen)
    want = reference.build_segments(weights, row_ids, slot_ids, num_experts)
    got = build_segments(weights.to(DEVICE), row_ids.to(DEVICE), slot_ids.to(DEVICE), num_experts)
    check_padded(got, want, num_rows * width)
    if got.num_assignments < num_rows * width:  # padding row ids are real rows
        assert torch.all(torch.isin(got.row_ids.cpu(), row_ids))


def test_ties_keep_the_order_of_the_input_rows():
    weights = torch.tensor([[0.5, 0.0], [0.2, 0.7], [0.1, 0.3], [0.0, 0.4]])
    row_ids = torch.tensor([9, 2, 7, 0])
    slot_ids = torch.tensor([1, 1, 1, 1])
    got = build_segments(weights.to(DEVICE), row_ids.to(DEVICE), slot_ids.to(DEVICE), 2)
    assert got.trimmed().row_ids.tolist() == [9, 2, 7, 2, 7, 0]
    assert got.trimmed().group_ids.tolist() == [2, 2, 2, 3, 3, 3]


def make_segments(count: int, num_groups: int, row_offset: int, gen: torch.Generator) -> Segments:
    groups = torch.randint(0, num_groups, (count,), generator=gen)
    order = torch.argsort(groups, stable=True)
    return Segments(
        row_ids=(row_offset + torch.arange(count))[order],
        group_ids=groups[order],
        weights=(torch.rand(count, generator=gen) + 0.01)[order],
    )


def pad(seg: Segments, extra: int, gen: torch.Generator) -> Segments:
    """Append `extra` junk entries past a device-side num_valid."""
    count = seg.row_ids.shape[0]
    last = seg.group_ids[-1:] if count else torch.zeros(1, dtype=torch.int64)
    return Segments(
        row_ids=torch.cat([seg.row_ids, torch.randint(0, 5000, (extra,), generator=gen)]),
        group_ids=torch.cat([seg.group_ids, last.expand(extra)]),
        weights=torch.cat([seg.weights, torch.rand(extra, generator=gen)]),  # junk, not 0
        num_valid=torch.tensor(count),
    )


def on_device(seg: Segments) -> Segments:
    nv = None if seg.num_valid is None else seg.num_valid.to(DEVICE)
    return Segments(seg.row_ids.to(DEVICE), seg.group_ids.to(DEVICE), seg.weights.to(DEVICE), nv)


@pytest.mark.parametrize(("count_a", "count_b"), [(0, 0), (0, 5), (6, 0), (40, 25), (300, 1)])
@pytest.mark.parametrize(
    ("pad_a", "pad_b"), [(0, 0), (7, 0), (0, 3), (4, 9)], ids=["exact", "first", "second", "both"]
)
def test_concat_segments_matches_reference(count_a, count_b, pad_a, pad_b):
    gen = torch.Generator().manual_seed(count_a * 31 + count_b)
    first = make_segments(count_a, 12, 0, gen)
    second = make_segments(count_b, 12, 1000, gen)
    want = reference.concat_segments(first, second)
    a = pad(first, pad_a, gen) if pad_a else first
    b = pad(second, pad_b, gen) if pad_b else second
    got = concat_segments(on_device(a), on_device(b))
    check_padded(got, want, count_a + pad_a + count_b + pad_b)
    # The reference accepts padded inputs too (it trims them).
    fixed = reference.concat_segments(a, b)
    assert fixed.num_valid is None
    for name in ("row_ids", "group_ids", "weights"):
        assert torch.equal(getattr(fixed, name), getattr(want, name)), name


def test_concat_of_built_segments_feeds_the_next_concat():
    """plain + routed at one site: device-built padded segments through two merges."""
    gen = torch.Generator().manual_seed(4)
    weights = routing_matrix(30, 4, 0.5, gen)
    rows, slots = torch.arange(30), torch.randint(0, 3, (30,), generator=gen)
    routed = build_segments(weights.to(DEVICE), rows.to(DEVICE), slots.to(DEVICE), 4)
    plain = make_segments(10, 12, 100, gen)
    got = concat_segments(concat_segments(on_device(plain), routed), routed)
    want_routed = reference.build_segments(weights, rows, slots, 4)
    want = reference.concat_segments(reference.concat_segments(plain, want_routed), want_routed)
    check_padded(got, want, 10 + 2 * 30 * 4)
