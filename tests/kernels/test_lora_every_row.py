"""Bags over assignments that hold every row once (a decode step's plain-LoRA rows): their
deltas go back in row order by a gather and one add, with no scatter, for one site and for
joint sites (q/k/v), against a float64 loop; other row sets scatter once for all sites."""

from __future__ import annotations

import pytest
import torch
from support.lora_cases import JOINT_HIDDEN, joint_sites

from mixserve.kernels import Segments, joint_lora_a, lora_apply, lora_apply_joint
from mixserve.kernels.lora import reference

# The torch reference's strategies through the wrappers (compiled CPU kernel: test_lora_cpu.py).
pytestmark = pytest.mark.usefixtures("reference_kernels")


NUM_ROWS = 24


def _segments(gen: torch.Generator, rows: torch.Tensor) -> Segments:
    """Plain-LoRA segments of rows (one assignment each), sorted by a random group."""
    groups = torch.randint(0, 12, (rows.shape[0],), generator=gen)
    order = torch.argsort(groups, stable=True)
    weights = torch.rand(rows.shape[0], generator=gen) + 0.5
    return Segments(rows[order], groups[order], weights[order])


def _naive(x, lora_as, lora_bs, scales, segments, out) -> torch.Tensor:
    want = out.double().clone()
    col = 0
    for lora_a, lora_b, scale in zip(lora_as, lora_bs, scales, strict=True):
        width = lora_b.shape[1]
        for p in range(segments.row_ids.shape[0]):
            row, group = int(segments.row_ids[p]), int(segments.group_ids[p])
            coef = float(segments.weights[p]) * float(scale[group])
            delta = lora_b[group].double() @ (lora_a[group].double() @ x[row].double())
            want[row, col : col + width] += coef * delta
        col += width
    return want


def _bags_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reference, "row_runs", lambda row_ids, group_ids: None)
    monkeypatch.setattr(reference, "padded_groups", lambda group_ids: None)


def _count_scatters(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = torch.Tensor.index_add_

    def counting(self, dim, index, source, **kwargs):
        calls.append(int(index.shape[0]))
        return real(self, dim, index, source, **kwargs)

    monkeypatch.setattr(torch.Tensor, "index_add_", counting)
    return calls


@pytest.mark.parametrize("joint", [False, True], ids=["one_site", "qkv"])
@pytest.mark.parametrize("rows", ["every_row", "some_rows"])
def test_bags_of_every_row_add_in_place_and_others_scatter_once(joint, rows, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    sites = joint_sites(torch.float32, gen)
    if rows == "every_row":  # a permutation of all rows: the scheduler's order is any order
        row_ids = torch.randperm(NUM_ROWS, generator=gen)
    else:  # rows without an adapter in between
        row_ids = torch.randperm(NUM_ROWS, generator=gen)[: NUM_ROWS - 5]
    segments = _segments(gen, row_ids)
    x = torch.randn(NUM_ROWS, JOINT_HIDDEN, generator=gen)
    n = 3 if joint else 1
    lora_as, lora_bs, scales = sites.lora_as[:n], sites.lora_bs[:n], sites.scales[:n]
    out = torch.randn(NUM_ROWS, sum(b.shape[1] for b in lora_bs), generator=gen)
    want = _naive(x, lora_as, lora_bs, scales, segments, out)
    _bags_only(monkeypatch)
    scatters = _count_scatters(monkeypatch)
    if joint:
        lora_a = joint_lora_a(*lora_as)
        assert lora_a is not None
        lora_apply_joint(x, lora_a, lora_bs, segments, out, group_scales=scales)
    else:
        lora_apply(x, lora_as[0], lora_bs[0], segments, None, out, group_scale=scales[0])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    # Every row: no scatter at all; otherwise one for all n sites.
    assert scatters == ([] if rows == "every_row" else [row_ids.shape[0]])


def test_every_row_order_is_built_once_per_segments_and_row_count():
    gen = torch.Generator().manual_seed(6)
    segments = _segments(gen, torch.randperm(8, generator=gen))
    order = reference._every_row_order(segments, 8)
    assert order is not None and reference._every_row_order(segments, 8) is order
    assert torch.equal(segments.row_ids.index_select(0, order), torch.arange(8))
    assert reference._every_row_order(segments, 9) is None  # a row without an assignment
    twice = Segments(torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]), torch.ones(3))
    assert reference._every_row_order(twice, 3) is None  # a row routed to two groups
