"""The FFN with every adapter family in one pass (ARCHITECTURE: "The MoE-LoRA FFN").

Base gate/up projections run once for all tokens. Rows of plain-LoRA and plugin-MoE adapters get
their per-projection deltas. Rows of MixLoRA adapters are routed to whole-FFN experts: each
assignment p = (t, e, w) gets ``h_p = act(g[t] + dg_e) * (u[t] + du_e)``; because the down
projection is linear, ``sum_e w_e W_d h_e = W_d (sum_e w_e h_e)``, so the base down projection
also runs once per token and only the routed down-LoRA deltas scale with k.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from mixserve.kernels import ExpertLora, moe_lora_ffn, route
from mixserve.model.context import LoraBatch, count_routed
from mixserve.model.layers import linear
from mixserve.model.lora import add_site_delta, add_site_deltas

# ACT2FN's names for SiLU, whose module only calls F.silu: F.silu itself lets the kernels
# recognise it (the compiled CPU MoE kernel computes SiLU in place).
_SILU_NAMES = ("silu", "swish")


@functools.cache
def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    # ACT2FN builds a new nn.Module at every lookup: once per name, not once per layer and step.
    return F.silu if name in _SILU_NAMES else ACT2FN[name]


def _expert_lora(lora: LoraBatch, site: str, layer_idx: int) -> ExpertLora:
    stack = lora.stacks.sites[site]
    return ExpertLora(
        stack.lora_a[layer_idx], stack.lora_b[layer_idx], stack.scale[layer_idx], stack.group_ranks
    )


def _mixlora_experts(
    lora: LoraBatch, layer_idx: int, x: torch.Tensor, gate_up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [N, I] = sum_e w_e h_e, down deltas [N, H], sum_e w_e [N]) for the MixLoRA rows."""
    ffn = lora.ffn
    assert ffn is not None and lora.stacks.ffn_router is not None
    router = lora.stacks.ffn_router[layer_idx]
    x_rows = x.index_select(0, ffn.rows)
    weights = route(x_rows, ffn.slots, router, lora.stacks.routing, ffn.routing_memo)  # [N, E]
    count_routed(lora, ffn.slots, weights)
    experts = [
        _expert_lora(lora, site, layer_idx) for site in ("gate_proj", "up_proj", "down_proj")
    ]
    if len(ffn.activations) == 1:
        act = _activation(ffn.activations[0][0])
        hidden, down_delta = moe_lora_ffn(x, gate_up, ffn.rows, ffn.slots, weights, *experts, act)
        return hidden, down_delta, weights.sum(-1)
    hidden = x.new_empty(ffn.rows.shape[0], gate_up.shape[1] // 2)
    down_delta = x.new_empty(ffn.rows.shape[0], x.shape[1])
    for name, act_slots in ffn.activations:  # adapters with different expert activations
        part = torch.nonzero(torch.isin(ffn.slots, act_slots), as_tuple=True)[0]
        h, d = moe_lora_ffn(
            x, gate_up, ffn.rows[part], ffn.slots[part], weights[part], *experts, _activation(name)
        )
        hidden[part], down_delta[part] = h, d
    return hidden, down_delta, weights.sum(-1)


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

    add_site_deltas(lora, ("gate_proj", "up_proj"), layer_idx, x, gate_up)

    ffn = lora.ffn
    if ffn is None:
        hidden = act(gate) * up  # [T, I]
        out = linear(hidden, down_weight, down_bias)  # [T, H]
        add_site_delta(lora, "down_proj", layer_idx, hidden, out)
        return out
    expert_hidden, down_delta, weight_sums = _mixlora_experts(lora, layer_idx, x, gate_up)
    # ffn.rows increase, so N == T means every row is a MixLoRA row, in order: no row needs the
    # base activation.
    every_row = ffn.rows.shape[0] == x.shape[0]
    if every_row:
        hidden = expert_hidden
    else:
        hidden = act(gate) * up  # [T, I]
        hidden[ffn.rows] = expert_hidden  # h_bar = sum_e w_e h_e: the base down projection once
    out = linear(hidden, down_weight, down_bias)  # [T, H]
    if down_bias is not None:
        # Each expert's output carries the bias, so MixLoRA rows get (sum_e w_e) * b; that is 1 * b
        # only under renormalised top-k (top-p and switch weights do not sum to 1).
        down_delta += (weight_sums - 1).to(out.dtype)[:, None] * down_bias
    if every_row:
        out += down_delta
    else:
        out.index_add_(0, ffn.rows, down_delta)
    add_site_delta(lora, "down_proj", layer_idx, hidden, out)
    return out
