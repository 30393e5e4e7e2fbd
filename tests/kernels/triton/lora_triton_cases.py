"""Routed-LoRA test batches shared by the Triton LoRA and MoE-FFN tests: routing matrices, exact
(reference-built) and padded (device-built) segments, zero-padded mixed-rank A/B stacks, and
float32 evaluations of the reference ops on the CPU as the oracle."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from support.lora_cases import TOL, Scenario, lora_stacks

from mixserve.kernels import Segments
from mixserve.kernels.assignments import reference as segments_reference
from mixserve.kernels.assignments import triton as segments_device

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# Interpreter-sized (CPU) and full-size (GPU) grids over the axes: 1..2048 tokens,
# 1..16 experts, 1..32 adapters, ranks 4..64 mixed, empty segments and one huge segment.
SMALL = {
    "plain_one_token": Scenario(1, 1, 1, 32, 16, 1),
    "few_slots": Scenario(40, 5, 4, 40, 24, 2),
    "unaligned_dims": Scenario(23, 3, 3, 6, 10, 2),
    "all_ranks": Scenario(40, 6, 4, 64, 40, 3),
    "32_slots_16_experts": Scenario(20, 32, 16, 24, 20, 4),
    "one_huge_segment": Scenario(100, 4, 8, 32, 16, 1, used_groups=(21,)),
    "mostly_empty_groups": Scenario(24, 32, 16, 16, 16, 1, used_groups=(3, 200, 511)),
    "no_assignments": Scenario(0, 4, 4, 32, 16, 1),
}
FULL = {
    "plain_one_token": Scenario(1, 1, 1, 4096, 4096, 1),
    "decode_32_adapters": Scenario(64, 32, 8, 2048, 2048, 2),
    "all_ranks": Scenario(512, 6, 4, 1024, 768, 3),
    "2048_tokens_32x16": Scenario(2048, 32, 16, 1024, 1024, 4),
    "one_huge_segment": Scenario(2048, 4, 8, 2048, 1024, 1, used_groups=(21,)),
    "mostly_empty_groups": Scenario(300, 32, 16, 512, 512, 1, used_groups=(3, 200, 511)),
    "no_assignments": Scenario(0, 4, 4, 256, 128, 1),
}
SCENARIOS = FULL if ON_GPU else SMALL


@dataclass
class Batch:
    x: torch.Tensor  # [N, K] on DEVICE
    lora_a: torch.Tensor  # [G, R, K], rows >= the group's rank are zero
    lora_b: torch.Tensor  # [G, N_out, R], columns >= the group's rank are zero
    ranks: torch.Tensor  # [G] int32
    exact: Segments  # reference-built, num_valid None
    padded: Segments  # device-built, P = N * E, num_valid set
    slot_scale: torch.Tensor  # [S] float32

    def segments(self, padded: bool) -> Segments:
        return self.padded if padded else self.exact

    def coef(self, seg: Segments) -> torch.Tensor:
        """weight * scale per assignment (0 on padding, whose weight is 0)."""
        num_experts = self.lora_a.shape[0] // self.slot_scale.shape[0]
        return seg.weights * self.slot_scale[seg.group_ids // num_experts]


def routing(sc: Scenario, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [N, E] with 0 = not selected, slots [N]) for the scenario."""
    weights = torch.zeros(sc.num_tokens, sc.num_experts)
    slots = torch.zeros(sc.num_tokens, dtype=torch.int64)
    for row in range(sc.num_tokens):
        if sc.used_groups is not None:
            pick = int(torch.randint(0, len(sc.used_groups), (1,), generator=gen))
            group = sc.used_groups[pick]
            slots[row] = group // sc.num_experts
            weights[row, group % sc.num_experts] = float(torch.rand(1, generator=gen)) + 0.05
            continue
        slots[row] = int(torch.randint(0, sc.num_slots, (1,), generator=gen))
        fanout = int(torch.randint(1, min(sc.max_fanout, sc.num_experts) + 1, (1,), generator=gen))
        experts = torch.randperm(sc.num_experts, generator=gen)[:fanout]
        weights[row, experts] = torch.rand(fanout, generator=gen) + 0.05
    return weights, slots


@functools.cache
def make_batch(sc: Scenario, dtype: torch.dtype, seed: int) -> Batch:
    """Shared between tests, which only read it."""
    gen = torch.Generator().manual_seed(seed)
    lora_a, lora_b, ranks = lora_stacks(sc, gen)
    weights, slots = routing(sc, gen)
    rows = torch.sort(torch.randperm(2 * sc.num_tokens + 1, generator=gen)[: sc.num_tokens]).values
    x = torch.randn(int(rows.max()) + 1 if sc.num_tokens else 0, sc.hidden, generator=gen)
    exact = segments_reference.build_segments(weights, rows, slots, sc.num_experts)
    to = functools.partial(torch.Tensor.to, device=DEVICE)
    padded = segments_device.build_segments(to(weights), to(rows), to(slots), sc.num_experts)
    exact = Segments(to(exact.row_ids), to(exact.group_ids), to(exact.weights))
    return Batch(
        x=x.to(DEVICE, dtype),
        lora_a=lora_a.to(DEVICE, dtype),
        lora_b=lora_b.to(DEVICE, dtype),
        ranks=torch.tensor(ranks, dtype=torch.int32, device=DEVICE),
        exact=exact,
        padded=padded,
        slot_scale=(torch.rand(sc.num_slots, generator=gen) * 2 + 0.5).to(DEVICE),
    )


def cpu32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype)


def cpu_segments(seg: Segments) -> Segments:
    nv = None if seg.num_valid is None else seg.num_valid.cpu()
    return Segments(seg.row_ids.cpu(), seg.group_ids.cpu(), seg.weights.cpu(), nv)


def assert_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """got (any device, dtype) against a float32 CPU oracle, relative to its largest value."""
    assert got.shape == want.shape
    tol = TOL[dtype]
    scale = max(float(want.abs().max()), 1e-6) if want.numel() else 1.0
    torch.testing.assert_close(cpu32(got), want, rtol=tol, atol=tol * scale)
