"""Torch baselines of the MixLoRA FFN layer, computing the same function as mixserve's path.

- segment loop: mixserve's structure (base gate/up and down once for all tokens, sum_e w_e h_e
  before the down projection) with the expert LoRAs of each selected (adapter, expert) pair in
  a Python loop of torch matmuls;
- MoE-PEFT loop: what the authors' framework runs (`mixlora` 0.2.3 `MixLoraSparseMoe`), once
  per adapter on that adapter's tokens: base gate/up, router softmax/top-k (renormalised), then
  for every expert (selected by some token or not) its whole FFN on its tokens, base down
  included, plus the expert's LoRAs, weighted and summed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from moe_lora_workload import ACT, Batch, Layer, LoraPairCase


def _lora(layer: Layer, which: str, group: int, v: torch.Tensor) -> torch.Tensor:
    """scale_g * B_g A_g v for one group g = slot * E + expert: [n, in] -> [n, out]."""
    lora = {"gate": layer.gate, "up": layer.up, "down": layer.down_lora}[which]
    a = lora.lora_a.flatten(0, 1)[group]  # [r, in]
    b = lora.lora_b.flatten(0, 1)[group]  # [out, r]
    return F.linear(F.linear(v, a), b) * layer.host_scale[group]


def _host_groups(group_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(group, start, end) of each run of a sorted group-id vector (one host sync)."""
    groups, counts = torch.unique_consecutive(group_ids, return_counts=True)
    bounds = [0, *torch.cumsum(counts, 0).tolist()]
    return [(g, bounds[j], bounds[j + 1]) for j, g in enumerate(groups.tolist())]


def topk_weights(layer: Layer, x: torch.Tensor, slots: torch.Tensor, top_k: int) -> torch.Tensor:
    """Routing weights [N, E] float32: per adapter fp32 logits, softmax, top-k renormalised."""
    num_experts = layer.router.shape[1]
    logits = torch.empty(x.shape[0], num_experts, dtype=torch.float32, device=x.device)
    for slot in torch.unique(slots).tolist():
        idx = torch.nonzero(slots == slot, as_tuple=True)[0]
        logits[idx] = F.linear(x.index_select(0, idx).float(), layer.router[slot])  # [n, E]
    top = logits.softmax(-1).topk(top_k, dim=-1)
    values = top.values / top.values.sum(-1, keepdim=True)
    return torch.zeros_like(logits).scatter_(1, top.indices, values)


def segment_loop_ffn(layer: Layer, batch: Batch, top_k: int) -> torch.Tensor:
    """[T, H] -> [T, H] with one loop iteration per selected (adapter, expert) pair."""
    x, rows, slots = batch.x, batch.rows, batch.slots
    intermediate, num_experts = layer.down.shape[1], layer.router.shape[1]
    gate_up = F.linear(x, layer.gate_up)  # [T, 2I]
    hidden = ACT(gate_up[:, :intermediate]) * gate_up[:, intermediate:]  # [T, I]
    weights = topk_weights(layer, x.index_select(0, rows), slots, top_k)  # [N, E]
    routed, experts = torch.nonzero(weights > 0, as_tuple=True)  # [P] each
    group_ids = slots[routed] * num_experts + experts
    order = torch.argsort(group_ids, stable=True)
    routed, experts, group_ids = routed[order], experts[order], group_ids[order]
    w = weights[routed, experts].to(x.dtype)  # [P]
    expert_hidden = x.new_zeros(rows.shape[0], intermediate)  # [N, I]
    down_delta = x.new_zeros(rows.shape[0], x.shape[1])  # [N, H]
    for group, start, end in _host_groups(group_ids):
        local = routed[start:end]  # routed rows of this group
        tokens = rows[local]
        x_g = x.index_select(0, tokens)  # [n, H]
        g = gate_up[tokens, :intermediate] + _lora(layer, "gate", group, x_g)
        u = gate_up[tokens, intermediate:] + _lora(layer, "up", group, x_g)
        h = ACT(g) * u * w[start:end, None]  # [n, I] weighted: the down LoRA is linear
        expert_hidden.index_add_(0, local, h)
        down_delta.index_add_(0, local, _lora(layer, "down", group, h))
    hidden[rows] = expert_hidden
    out = F.linear(hidden, layer.down)  # [T, H]
    out.index_add_(0, rows, down_delta)
    return out


def moe_peft_ffn(layer: Layer, batch: Batch, top_k: int) -> torch.Tensor:
    """[T, H] -> [T, H], one adapter at a time, every expert of it in turn (MixLoraSparseMoe)."""
    x, slots = batch.x, batch.slots
    intermediate, num_experts = layer.down.shape[1], layer.router.shape[1]
    w_gate, w_up = layer.gate_up[:intermediate], layer.gate_up[intermediate:]  # [I, H] each
    out = torch.empty(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)  # [T, H]
    for slot in torch.unique(slots).tolist():
        idx = torch.nonzero(slots == slot, as_tuple=True)[0]
        xs = x.index_select(0, idx)  # [n, H]
        common_gate, common_up = F.linear(xs, w_gate), F.linear(xs, w_up)  # [n, I] each
        probs = F.linear(xs.float(), layer.router[slot]).softmax(-1)  # [n, E]
        top_w, top_e = probs.topk(top_k, dim=-1)  # [n, k]
        top_w = top_w / top_w.sum(-1, keepdim=True)
        expert_mask = F.one_hot(top_e, num_experts).permute(2, 1, 0)  # [E, k, n]
        final = torch.zeros(xs.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        for expert in range(num_experts):
            kth, top_x = torch.where(expert_mask[expert])
            group = slot * num_experts + expert
            x_e = xs[top_x]
            g = common_gate[top_x] + _lora(layer, "gate", group, x_e)
            u = common_up[top_x] + _lora(layer, "up", group, x_e)
            h = ACT(g) * u  # [n_e, I]
            y = F.linear(h, layer.down) + _lora(layer, "down", group, h)  # [n_e, H]
            final.index_add_(0, top_x, (y * top_w[top_x, kth, None]).float())
        out[idx] = final
    return out.to(x.dtype)


def lora_pair_loop(layer: Layer, batch: Batch, case: LoraPairCase) -> None:
    """run_lora_pair's function as a per-segment torch loop: out[p] += scale B A x[t(p)]."""
    intermediate = layer.down.shape[1]
    token_rows = case.by_token.row_ids
    for group, start, end in _host_groups(case.segments.group_ids):
        x_g = batch.x.index_select(0, token_rows[start:end])  # [n, H]
        case.out[start:end, :intermediate] += _lora(layer, "gate", group, x_g)
        case.out[start:end, intermediate:] += _lora(layer, "up", group, x_g)
