"""Pure-torch MixLoRA experts over the selected (row, expert) pairs.

The pairs are sorted into (slot, expert) segments; only the selected experts' weights are read
and the activation runs on the selected pairs only. The expands are rank-row bags
(kernels/_rank_bags.py: no call per (slot, expert) group). The shrinks (x A and h A_down) are
either input-row bags over the pool's [.., in, R] A storage (a group's A read once per pair, no
call per group: decode steps, where most groups have a pair or two) or segmented GEMMs (each
group's A read once for all its pairs, a GEMM call per group: prefill steps, many pairs per
group). Two earlier strategies, every expert of a slot in batched GEMMs ("dense", removed in
session 13) and every expert's A of a slot against the rows padded by slot ("pairs", removed in
session 15), lost to bags once A was stored for them: see bench/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

# The sub-ops' references, never their dispatching wrappers: this file is the oracle the Triton
# version is tested against, so it must not turn into Triton when MIXSERVE_KERNELS=triton.
from mixserve.kernels._rank_bags import (
    MAX_BAG_ASSIGNMENTS_PER_GROUP,
    RankBags,
    bag_expand,
    bag_shrink,
)
from mixserve.kernels.assignments.reference import build_segments
from mixserve.kernels.assignments.segments import Segments
from mixserve.kernels.lora.joint import joint_lora_a
from mixserve.kernels.lora.reference import lora_shrink

if TYPE_CHECKING:
    from mixserve.kernels.moe_lora_ffn import ExpertLora

Act = Callable[[torch.Tensor], torch.Tensor]
SHRINKS = ("auto", "bags", "grouped")


def _selected_pairs(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    rows: torch.Tensor,
    segments: Segments,
    gate: ExpertLora,
    up: ExpertLora,
    down: ExpertLora,
    act: Act,
    bag_shrinks: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_rows = rows.shape[0]
    intermediate = gate_up.shape[1] // 2
    group_ids = segments.group_ids
    token_rows = rows.index_select(0, segments.row_ids)
    x_p = x.index_select(0, token_rows)  # [P, H]
    gate_up_p = gate_up.index_select(0, token_rows)  # [P, 2I]
    bags = RankBags(group_ids)  # bag indices, shared by the three projections

    def shrink(lora_a: torch.Tensor, rows_p: torch.Tensor) -> torch.Tensor:  # [P, R']
        if bag_shrinks:
            return bag_shrink(rows_p, lora_a, bags)
        return lora_shrink(rows_p, lora_a, segments, gather_rows=False)

    def expand(lora: ExpertLora, shrunk: torch.Tensor) -> torch.Tensor:  # [P, out]
        rank = lora.lora_a.shape[2]
        shrunk.mul_(lora.scale.index_select(0, group_ids).to(x.dtype)[:, None])  # [P, R]
        return bag_expand(shrunk, lora.lora_b, bags.ids(rank), bags.offsets(rank))

    rank = gate.lora_a.shape[2]
    joint = joint_lora_a(gate.lora_a, up.lora_a)
    if joint is not None:  # one pass over x_p and both A
        shrunk = shrink(joint, x_p)  # [P, 2R]
        gate_s, up_s = shrunk[:, :rank], shrunk[:, rank:]
    else:
        gate_s = shrink(gate.lora_a.flatten(0, 1), x_p)
        up_s = shrink(up.lora_a.flatten(0, 1), x_p)
    g = expand(gate, gate_s).add_(gate_up_p[:, :intermediate])
    u = expand(up, up_s).add_(gate_up_p[:, intermediate:])
    # The weight goes onto h_p: the down LoRA is linear, so shrinking w h_p equals weighting later.
    hidden_p = act(g).mul_(u).mul_(segments.weights.to(x.dtype)[:, None])  # [P, I]
    hidden = hidden_p.new_zeros(num_rows, intermediate).index_add_(0, segments.row_ids, hidden_p)
    down_p = expand(down, shrink(down.lora_a.flatten(0, 1), hidden_p))  # [P, H]
    down_delta = x.new_zeros(num_rows, down_p.shape[1]).index_add_(0, segments.row_ids, down_p)
    return hidden, down_delta


def moe_lora_ffn(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    gate: ExpertLora,
    up: ExpertLora,
    down: ExpertLora,
    act: Callable[[torch.Tensor], torch.Tensor],
    shrink: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """shrink: "auto" (bags while the groups average at most MAX_BAG_ASSIGNMENTS_PER_GROUP
    pairs), "bags" or "grouped"; all compute the same function."""
    if shrink not in SHRINKS:
        raise ValueError(f"unknown shrink {shrink!r}: expected one of {', '.join(SHRINKS)}")
    num_rows, num_experts = weights.shape
    intermediate = gate_up.shape[1] // 2
    if num_rows == 0:
        return x.new_zeros(0, intermediate), x.new_zeros(0, x.shape[1])
    # The selected (row, expert) pairs sorted by group; their row_ids index into rows.
    row_index = torch.arange(num_rows, device=rows.device)
    segments = build_segments(weights, row_index, slots, num_experts)  # [P]
    num_assignments = segments.row_ids.shape[0]
    if num_assignments == 0:
        return x.new_zeros(num_rows, intermediate), x.new_zeros(num_rows, x.shape[1])
    if shrink == "auto":
        num_groups = int(torch.count_nonzero(torch.diff(segments.group_ids))) + 1
        shrink = (
            "bags" if num_assignments <= MAX_BAG_ASSIGNMENTS_PER_GROUP * num_groups else "grouped"
        )
    return _selected_pairs(x, gate_up, rows, segments, gate, up, down, act, shrink == "bags")
