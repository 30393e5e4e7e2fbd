"""Pure-torch MixLoRA experts over the selected (row, expert) pairs.

The pairs stay in token order (a row's pairs adjacent); only the selected experts' weights are
read and the activation runs on the selected pairs only. Under a fixed k (top-k, switch) the
base gate/up projections broadcast onto each row's k pairs and the down deltas sum over k, so no
[P, 2I] gather or [P, H] scatter is made; the routing weights go onto the hidden sum (one bag per
row) and onto the down shrink's [P, R] result, not onto a [P, I] pass. The expands are rank-row
bags (kernels/_rank_bags.py: no call per (slot, expert) group). The shrinks (x A and h A_down)
are either input-row bags over the pool's [.., in, R] A storage (a group's A read once per pair,
no call per group: decode steps and prefill steps over many adapters) or grouped GEMMs on the
pairs gathered into group order (each group's A read once for all its pairs, a GEMM call per
group: a few adapters' long prompts). Two earlier strategies, every expert of a slot in batched
GEMMs ("dense", removed in session 13) and every expert's A of a slot against the rows padded
by slot ("pairs", removed in session 15), lost to bags once A was stored for them; pairs sorted
by group (to session 26) cost a [P, 2I] gather, a weighting pass and two scatters that token
order does without: see bench/RESULTS.md.
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
    weighted_bag_sums,
)
from mixserve.kernels.assignments.segments import Segments
from mixserve.kernels.lora.joint import joint_lora_a
from mixserve.kernels.lora.reference import lora_shrink

if TYPE_CHECKING:
    from mixserve.kernels.moe_lora_ffn import ExpertLora

Act = Callable[[torch.Tensor], torch.Tensor]
SHRINKS = ("auto", "bags", "grouped")


def _sums_by_row(
    rows_p: torch.Tensor, pair_offsets: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """[N, D]: out[i] = sum of (weights[p] *) rows_p[p] over row i's pairs, which lie at
    pair_offsets[i] .. pair_offsets[i + 1] - 1 (token order; a row without pairs gets zeros)."""
    pair_ids = torch.arange(rows_p.shape[0], dtype=pair_offsets.dtype, device=rows_p.device)
    per_sample = None if weights is None else weights.to(rows_p.dtype)
    return weighted_bag_sums(rows_p, pair_ids, pair_offsets, per_sample)


def _token_pairs(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    rows: torch.Tensor,
    weights: torch.Tensor,
    pair_rows: torch.Tensor,
    experts: torch.Tensor,
    group_ids: torch.Tensor,
    gate: ExpertLora,
    up: ExpertLora,
    down: ExpertLora,
    act: Act,
    bag_shrinks: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts over the selected pairs (pair_rows, experts, group_ids [P]) in token order
    (pair_rows non-decreasing): a row's pairs are adjacent, so under a fixed k (every row k
    pairs: top-k, switch) the base projections broadcast onto [N, k, I] views and the down
    deltas sum over k without a gather or scatter; other routings gather and scatter by
    pair_rows."""
    num_rows, num_pairs = weights.shape[0], pair_rows.shape[0]
    intermediate = gate_up.shape[1] // 2
    pair_weights = weights[pair_rows, experts]  # [P] float32
    counts = torch.bincount(pair_rows, minlength=num_rows)  # [N]
    k = num_pairs // num_rows
    fixed_k = k * num_rows == num_pairs and bool((counts == k).all())
    token_rows = rows.index_select(0, pair_rows)  # [P]
    # Bag indices, shared by the three projections; groups index the [S * E] tables.
    bags = RankBags(group_ids, gate.lora_a.shape[0] * gate.lora_a.shape[1])
    sorted_shrink = None if bag_shrinks else _SortedShrink(group_ids)

    def shrink(lora_a: torch.Tensor, rows_p: torch.Tensor) -> torch.Tensor:  # [P, R']
        if sorted_shrink is None:
            return bag_shrink(rows_p, lora_a, bags)
        return sorted_shrink(rows_p, lora_a)

    def expand(lora: ExpertLora, shrunk: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        rank = lora.lora_a.shape[2]
        shrunk.mul_(coef.to(shrunk.dtype)[:, None])  # [P, R]
        return bag_expand(shrunk, lora.lora_b, bags.ids(rank), bags.offsets(rank))  # [P, out]

    x_p = x.index_select(0, token_rows)  # [P, H]
    rank = gate.lora_a.shape[2]
    joint = joint_lora_a(gate.lora_a, up.lora_a)
    if joint is not None:  # one pass over x_p and both A
        shrunk = shrink(joint, x_p)  # [P, 2R]
        gate_s, up_s = shrunk[:, :rank], shrunk[:, rank:]
    else:
        gate_s = shrink(gate.lora_a.flatten(0, 1), x_p)
        up_s = shrink(up.lora_a.flatten(0, 1), x_p)
    g = expand(gate, gate_s, gate.scale.index_select(0, group_ids))  # [P, I] deltas
    u = expand(up, up_s, up.scale.index_select(0, group_ids))
    if fixed_k:
        base = gate_up if _is_every_row(rows, gate_up) else gate_up.index_select(0, rows)
        base = base[:, None]  # [N, 1, 2I], broadcast over each row's k pairs
        g.view(num_rows, k, intermediate).add_(base[..., :intermediate])
        u.view(num_rows, k, intermediate).add_(base[..., intermediate:])
    else:
        base_p = gate_up.index_select(0, token_rows)  # [P, 2I]
        g.add_(base_p[:, :intermediate])
        u.add_(base_p[:, intermediate:])
    hidden_p = act(g).mul_(u)  # [P, I], unweighted
    pair_offsets = torch.cumsum(counts, 0) - counts  # [N] each row's first pair
    hidden = _sums_by_row(hidden_p, pair_offsets, pair_weights)  # [N, I]
    # The down LoRA is linear: shrinking h_p and weighting the [P, R] result equals shrinking
    # w h_p, one [P, I] pass fewer.
    down_coef = down.scale.index_select(0, group_ids) * pair_weights
    down_p = expand(down, shrink(down.lora_a.flatten(0, 1), hidden_p), down_coef)  # [P, H]
    if fixed_k:
        return hidden, down_p.view(num_rows, k, -1).sum(1)
    return hidden, _sums_by_row(down_p, pair_offsets, None)


def _is_every_row(rows: torch.Tensor, gate_up: torch.Tensor) -> bool:
    """Whether rows is 0 .. T - 1 in order (every token routed: gate_up needs no gather)."""
    num_tokens = gate_up.shape[0]
    if rows.shape[0] != num_tokens:
        return False
    return bool(torch.equal(rows, torch.arange(num_tokens, device=rows.device)))


class _SortedShrink:
    """Grouped-GEMM shrinks of pairs in token order: each call gathers the rows into group
    order, runs one GEMM per (slot, expert) group and puts the results back in token order."""

    def __init__(self, group_ids: torch.Tensor) -> None:
        self.order = torch.argsort(group_ids, stable=True)  # [P] token position per sorted place
        self.segments = Segments(
            row_ids=self.order,
            group_ids=group_ids.index_select(0, self.order),
            weights=torch.ones(group_ids.shape[0], device=group_ids.device),
        )

    def __call__(self, rows_p: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
        shrunk = lora_shrink(rows_p, lora_a, self.segments, gather_rows=True)  # sorted order
        return torch.empty_like(shrunk).index_copy_(0, self.order, shrunk)


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
    # The selected (row, expert) pairs in token order (row-major nonzero).
    pair_rows, experts = torch.nonzero(weights > 0, as_tuple=True)  # [P] each
    num_pairs = pair_rows.shape[0]
    if num_pairs == 0:
        return x.new_zeros(num_rows, intermediate), x.new_zeros(num_rows, x.shape[1])
    group_ids = slots.index_select(0, pair_rows) * num_experts + experts  # [P]
    if shrink == "auto":
        num_groups = int(torch.unique(group_ids).shape[0])
        shrink = "bags" if num_pairs <= MAX_BAG_ASSIGNMENTS_PER_GROUP * num_groups else "grouped"
    return _token_pairs(
        x,
        gate_up,
        rows,
        weights,
        pair_rows,
        experts,
        group_ids,
        gate,
        up,
        down,
        act,
        shrink == "bags",
    )
