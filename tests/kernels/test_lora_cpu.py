"""The compiled CPU LoRA-sites kernel (kernels/lora/cpu.cpp) against a float64 loop: one site and
joint q/k/v sites, every segment layout the engine makes, routed coefficients with rows on
several groups, strided rows and outputs; its batch invariance; and the wrappers' dispatch and
fallback. Skipped, with the reason, where this machine cannot build or run it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from support.lora_cases import JOINT_HIDDEN, joint_segments, joint_sites

from mixserve.kernels import Segments, joint_lora_a, lora_apply, lora_apply_joint
from mixserve.kernels.lora import cpu, reference

pytestmark = pytest.mark.skipif(
    cpu.module() is None, reason="compiled CPU kernel unavailable here (see its log warning)"
)
LAYOUTS = ["decode", "runs", "runs_and_rest", "decode_popular", "runs_and_many_rows", "many_rows"]


def _pool_sites(seed: int):
    """joint_sites with each B stored transposed, as the pool keeps it (A already is)."""
    gen = torch.Generator().manual_seed(seed)
    sites = joint_sites(torch.float32, gen)
    return gen, replace(sites, lora_bs=[b.mT.contiguous().mT for b in sites.lora_bs])


def _naive(x, lora_as, lora_bs, coef, segments, out) -> torch.Tensor:
    """out + sum over assignments p and sites i of coef[p, i] B_i (A_i x[row]), in float64."""
    want = out.double().clone()
    col = 0
    for i, (lora_a, lora_b) in enumerate(zip(lora_as, lora_bs, strict=True)):
        width = lora_b.shape[1]
        for p in range(segments.row_ids.shape[0]):
            row, group = int(segments.row_ids[p]), int(segments.group_ids[p])
            delta = lora_b[group].double() @ (lora_a[group].double() @ x[row].double())
            want[row, col : col + width] += float(coef[p, i]) * delta
        col += width
    return want


def _close(got, want):
    scale = max(float(want.abs().max()), 1e-6)
    assert float((got.double() - want).abs().max()) / scale < 2e-6


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_sites", [1, 3])
def test_joint_and_single_sites_match_the_loop(layout, num_sites):
    gen, sites = _pool_sites(LAYOUTS.index(layout))
    row_ids, group_ids, weights = joint_segments(layout, gen)
    segments = Segments(row_ids, group_ids, weights)
    lora_as, lora_bs = sites.lora_as[:num_sites], sites.lora_bs[:num_sites]
    lora_a = joint_lora_a(*lora_as) if num_sites > 1 else lora_as[0]
    num_rows = int(row_ids.max()) + 3
    x = torch.randn(num_rows, JOINT_HIDDEN, generator=gen)
    out = torch.randn(num_rows, sum(b.shape[1] for b in lora_bs), generator=gen)
    coef = weights[:, None] * torch.stack(sites.scales[:num_sites], 1)[group_ids]  # [P, n]
    want = _naive(x, lora_as, lora_bs, coef, segments, out)
    assert cpu.why_not(x, lora_a, lora_bs, out) is None
    cpu.lora_apply_sites(x, lora_a, lora_bs, segments, coef, out)
    _close(out, want)


@pytest.mark.parametrize("rank", [8, 16, 32, 64])
def test_routed_rows_on_several_groups_strided_rows_and_columns(rank):
    """A routed site (coef per assignment, rows on up to 3 groups), x a strided row view and out
    a column slice of a wider tensor, at each rank the kernel takes alone."""
    gen = torch.Generator().manual_seed(rank)
    num_groups, hidden, width, num_rows = 10, 48, 70, 17
    lora_a = (torch.randn(num_groups, hidden, rank, generator=gen) / hidden**0.5).mT
    lora_b = torch.randn(num_groups, rank, width, generator=gen).mT
    rows = torch.arange(num_rows).repeat_interleave(3)
    groups = torch.randint(0, num_groups, (rows.shape[0],), generator=gen)
    keep = torch.rand(rows.shape[0], generator=gen) < 0.7
    rows, groups = rows[keep], groups[keep]
    order = torch.argsort(groups, stable=True)
    segments = Segments(rows[order], groups[order], torch.rand(rows.shape[0], generator=gen))
    coef = torch.rand(rows.shape[0], generator=gen) + 0.1
    x = torch.randn(2 * num_rows, hidden, generator=gen)[::2]
    wide = torch.randn(num_rows, width + 20, generator=gen)
    out = wide[:, 7 : 7 + width]
    want = _naive(x, [lora_a], [lora_b], coef[:, None], segments, out)
    untouched = wide[:, :7].clone(), wide[:, 7 + width :].clone()
    lora_apply(x, lora_a, lora_b, segments, coef, out)
    _close(out, want)
    assert torch.equal(wide[:, :7], untouched[0]) and torch.equal(
        wide[:, 7 + width :], untouched[1]
    )


def test_a_rows_result_does_not_depend_on_the_batch():
    gen, sites = _pool_sites(3)
    row_ids, group_ids, weights = joint_segments("decode_popular", gen)
    lora_a = joint_lora_a(*sites.lora_as)
    x = torch.randn(int(row_ids.max()) + 1, JOINT_HIDDEN, generator=gen)
    out = torch.zeros(x.shape[0], sum(b.shape[1] for b in sites.lora_bs))
    lora_apply_joint(
        x,
        lora_a,
        sites.lora_bs,
        Segments(row_ids, group_ids, weights),
        out,
        group_scales=sites.scales,
    )
    for p in (0, 5, row_ids.shape[0] - 1):
        one = torch.zeros_like(out)
        alone = Segments(row_ids[p : p + 1], group_ids[p : p + 1], weights[p : p + 1])
        lora_apply_joint(x, lora_a, sites.lora_bs, alone, one, group_scales=sites.scales)
        assert torch.equal(one[row_ids[p]], out[row_ids[p]])


def test_wrappers_take_the_kernel_under_auto_only(monkeypatch):
    gen, sites = _pool_sites(8)
    segments = Segments(*joint_segments("decode", gen))
    lora_a = joint_lora_a(*sites.lora_as)
    x = torch.randn(30, JOINT_HIDDEN, generator=gen)
    calls = []
    real = cpu.lora_apply_sites
    monkeypatch.setattr(cpu, "lora_apply_sites", lambda *a: calls.append(1) or real(*a))
    outs = []
    for mode in ("auto", "reference"):
        monkeypatch.setenv("MIXSERVE_KERNELS", mode)
        out = torch.zeros(30, 72)
        lora_apply_joint(x, lora_a, sites.lora_bs, segments, out, group_scales=sites.scales)
        outs.append(out)
    assert calls == [1]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def _unsupported():
    gen, sites = _pool_sites(9)
    segments = Segments(*joint_segments("decode", gen))
    x = torch.randn(30, JOINT_HIDDEN, generator=gen)
    a, b, scale = sites.lora_as[1], sites.lora_bs[1], sites.scales[1]
    yield "as in the pool", (x, a.contiguous(), b, segments, scale)
    yield "n R = 4", (x, a[:, :4], b[..., :4], segments, scale)
    yield "not float32", (x.double(), a.double(), b.double(), segments, scale)


@pytest.mark.parametrize("reason,args", list(_unsupported()))
def test_other_calls_fall_back_or_fail_when_forced(reason, args, monkeypatch):
    x, lora_a, lora_b, segments, scale = args
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=x.dtype)
    assert reason in cpu.why_not(x, lora_a, [lora_b], out)
    monkeypatch.setenv("MIXSERVE_KERNELS", "auto")
    lora_apply(x, lora_a, lora_b, segments, None, out, group_scale=scale)
    want = torch.zeros_like(out)
    reference.lora_apply(x, lora_a, lora_b, segments, None, want, group_scale=scale)
    assert torch.equal(out, want)
    monkeypatch.setenv("MIXSERVE_KERNELS", "cpu")
    with pytest.raises(RuntimeError, match=reason):
        lora_apply(x, lora_a, lora_b, segments, None, out, group_scale=scale)


def test_out_of_range_indices_are_errors_not_writes():
    gen, sites = _pool_sites(10)
    row_ids, group_ids, weights = joint_segments("decode", gen)
    x = torch.randn(24, JOINT_HIDDEN, generator=gen)
    lora_a, lora_b = sites.lora_as[1], sites.lora_bs[1]
    out = torch.zeros(24, lora_b.shape[1])
    coef = torch.ones(row_ids.shape[0], 1)
    past_rows = Segments(row_ids + 1, group_ids, weights)  # row 24 of 24
    past_groups = Segments(row_ids, group_ids + 1, weights)  # group 12 of 12
    for bad in (past_rows, past_groups):
        with pytest.raises(RuntimeError, match="is past"):
            cpu.lora_apply_sites(x, lora_a, [lora_b], bad, coef, out)
