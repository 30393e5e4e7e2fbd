"""The FFN with every adapter family in one pass (ARCHITECTURE: "The MoE-LoRA FFN").

Base gate/up projections run once for all tokens. Rows of plain-LoRA and plugin-MoE adapters get
their per-projection deltas. Rows of MixLoRA adapters are routed to whole-FFN experts: each
assignment p = (t, e, w) gets ``h_p = act(g[t] + dg_e) * (u[t] + du_e)``; because the down
projection is linear, ``sum_e w_e W_d h_e = W_d (sum_e w_e h_e)``, so the base down projection
also runs once per token and only the routed down-LoRA deltas scale with k.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.activations import ACT2FN

from mixserve.kernels import Segments, build_segments, lora_expand, lora_shrink, route
from mixserve.model.context import LoraBatch
from mixserve.model.layers import linear
from mixserve.model.lora import add_site_delta


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return ACT2FN[name]


def _expert_delta(
    lora: LoraBatch,
    site: str,
    layer_idx: int,
    x: torch.Tensor,
    segments: Segments,
    out: torch.Tensor,
    *,
    gather_rows: bool,
) -> None:
    """out[p] += scale * B_e A_e x[row] per assignment (no routing weight: it comes after act)."""
    stack = lora.stacks.sites[site]
    shrunk = lora_shrink(
        x, stack.lora_a[layer_idx].flatten(0, 1), segments, gather_rows=gather_rows
    )
    lora_expand(
        shrunk,
        stack.lora_b[layer_idx].flatten(0, 1),
        segments,
        stack.scale[layer_idx][segments.group_ids],
        out,
        scatter_rows=False,
    )


def _activate_assignments(
    lora: LoraBatch, segments: Segments, gate: torch.Tensor, up: torch.Tensor
) -> torch.Tensor:
    """h_p = act_slot(gate_p) * up_p with each slot's own MixLoRA activation."""
    activations = lora.ffn.activations  # type: ignore[union-attr]
    if len(activations) == 1:
        return _activation(activations[0][0])(gate) * up
    num_experts = lora.stacks.sites["gate_proj"].num_experts
    slots = segments.group_ids // num_experts
    hidden = torch.empty_like(up)
    for name, act_slots in activations:
        mask = torch.isin(slots, act_slots)
        hidden[mask] = _activation(name)(gate[mask]) * up[mask]
    return hidden


def mlp_forward(
    x: torch.Tensor,
    gate_up_weight: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor | None,
    act: Callable[[torch.Tensor], torch.Tensor],
    layer_idx: int,
    lora: LoraBatch | None,
) -> torch.Tensor:
    """x [T, H] (after post-attention norm) -> [T, H]."""
    intermediate = down_weight.shape[1]
    gate_up = linear(x, gate_up_weight, gate_up_bias)  # [T, 2I]
    gate, up = gate_up[:, :intermediate], gate_up[:, intermediate:]
    if lora is None:
        return linear(act(gate) * up, down_weight, down_bias)

    add_site_delta(lora, "gate_proj", layer_idx, x, gate)
    add_site_delta(lora, "up_proj", layer_idx, x, up)
    hidden = act(gate) * up  # [T, I]

    ffn = lora.ffn
    expert_segments = None
    if ffn is not None:
        assert lora.stacks.ffn_router is not None
        weights = route(
            x[ffn.rows], ffn.slots, lora.stacks.ffn_router[layer_idx], lora.stacks.routing
        )
        num_experts = lora.stacks.sites["gate_proj"].num_experts
        expert_segments = build_segments(weights, ffn.rows, ffn.slots, num_experts)
        rows = expert_segments.row_ids
        gate_p, up_p = gate[rows], up[rows]  # [P, I]: shared base projections, copied per expert
        _expert_delta(lora, "gate_proj", layer_idx, x, expert_segments, gate_p, gather_rows=True)
        _expert_delta(lora, "up_proj", layer_idx, x, expert_segments, up_p, gather_rows=True)
        expert_hidden = _activate_assignments(lora, expert_segments, gate_p, up_p)  # [P, I]
        hidden[ffn.rows] = 0
        hidden.index_add_(
            0, rows, expert_hidden * expert_segments.weights.to(hidden.dtype)[:, None]
        )

    out = linear(hidden, down_weight, down_bias)  # [T, H]
    if down_bias is not None and expert_segments is not None:
        # Each expert's output carries the bias, so MixLoRA rows get (sum_e w_e) * b; that is 1 * b
        # only under renormalised top-k (top-p and switch weights do not sum to 1).
        weight_sums = torch.zeros(out.shape[0], dtype=torch.float32, device=out.device)
        weight_sums.index_add_(0, expert_segments.row_ids, expert_segments.weights)
        correction = (weight_sums[ffn.rows] - 1).to(out.dtype)  # type: ignore[union-attr]
        out[ffn.rows] += correction[:, None] * down_bias  # type: ignore[union-attr]
    add_site_delta(lora, "down_proj", layer_idx, hidden, out)
    if expert_segments is not None and expert_segments.num_assignments:
        stack = lora.stacks.sites["down_proj"]
        shrunk = lora_shrink(
            expert_hidden, stack.lora_a[layer_idx].flatten(0, 1), expert_segments, gather_rows=False
        )
        coef = expert_segments.weights * stack.scale[layer_idx][expert_segments.group_ids]
        lora_expand(shrunk, stack.lora_b[layer_idx].flatten(0, 1), expert_segments, coef, out)
    return out
