"""One MixLoRA FFN layer of a 7B model with many adapters, laid out as the serving path stacks it,
and the mixserve calls the benchmark times (mirroring `mixserve.model.ffn.mlp_forward`).

Layout (serve/adapters/pool.py, one layer): base gate and up fused as gate_up [2I, H], down
[H, I]; every adapter in its own slot s with E experts at each of gate/up/down:
lora_a [S, E, r, in], lora_b [S, E, out, r], scale [S * E] float32 (group g = s * E + e), a
MixLoRA router [S, E, H] float32 and per-slot RoutingParams (top-k here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mixserve.kernels import (
    ExpertLora,
    RoutingParams,
    RoutingRule,
    Segments,
    build_segments,
    lora_expand_pair,
    lora_shrink_pair,
    moe_lora_ffn,
    route,
)

ACT = F.silu  # llama's hidden_act; ACT2FN["silu"] in the model


@dataclass(frozen=True, slots=True)
class LayerConfig:
    hidden: int  # H
    intermediate: int  # I
    experts: int  # E per adapter
    top_k: int
    rank: int  # r of every expert LoRA (a multiple of 8, as the pool stacks ranks)
    adapters: int  # S: one adapter per slot
    decode_tokens: tuple[int, ...]
    prefill_tokens: int


FULL = LayerConfig(4096, 11008, 8, 2, 16, 32, (1, 2, 4, 8, 16, 32, 64, 128, 256), 4096)
SMOKE = LayerConfig(64, 128, 4, 2, 8, 4, (1, 8), 32)


@dataclass(frozen=True, slots=True)
class Layer:
    gate_up: torch.Tensor  # [2I, H] base gate (rows :I) and up (rows I:)
    down: torch.Tensor  # [H, I]
    gate: ExpertLora  # a [S, E, r, H], b [S, E, I, r], scale [S * E]
    up: ExpertLora  # same shapes as gate
    down_lora: ExpertLora  # a [S, E, r, I], b [S, E, H, r]
    router: torch.Tensor  # [S, E, H] float32
    routing: RoutingParams  # [S] each: TOP_K, E experts, k
    host_scale: tuple[float, ...]  # [S * E] scale per group, on the host (the loops' scaling_)


@dataclass(frozen=True, slots=True)
class Batch:
    x: torch.Tensor  # [T, H] FFN input (after the post-attention norm)
    rows: torch.Tensor  # [T] int64: every token is a MixLoRA row
    slots: torch.Tensor  # [T] int64: token t -> adapter t % S


@dataclass(frozen=True, slots=True)
class LoraPairCase:
    """The gate/up expert LoRAs of one step's routed rows, as moe_lora_ffn runs them."""

    by_token: Segments  # [P] row ids = token rows: the shrink gathers x
    segments: Segments  # [P] row ids = routed rows (local)
    out: torch.Tensor  # [P, 2I] per-assignment gate/up rows the expand adds onto
    groups: int  # distinct (adapter, expert) pairs selected
    adapters: int  # distinct adapters among the tokens


def build_layer(cfg: LayerConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Layer:
    gen = torch.Generator(device=device).manual_seed(seed)
    h, i, e, r, s = cfg.hidden, cfg.intermediate, cfg.experts, cfg.rank, cfg.adapters

    def randn(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

    # alpha / r per adapter, varied so that a wrong group index would show in the cross-check.
    slot_scale = [2.0 * (1.0 + 0.25 * (slot % 3)) for slot in range(s)]
    host_scale = tuple(slot_scale[g // e] for g in range(s * e))
    scale = torch.tensor(host_scale, dtype=torch.float32, device=device)  # [S * E]

    def expert_lora(d_in: int, d_out: int) -> ExpertLora:
        # B is not zero (as at init): deltas of ~10% of the base output, visible in the check.
        a = randn(s, e, r, d_in, std=d_in**-0.5)  # [S, E, r, in]
        b = randn(s, e, d_out, r, std=0.1 * r**-0.5)  # [S, E, out, r]
        return ExpertLora(a, b, scale)

    routing = RoutingParams.empty(s, device)
    routing.rule.fill_(int(RoutingRule.TOP_K))
    routing.num_experts.fill_(e)
    routing.top_k.fill_(cfg.top_k)
    return Layer(
        gate_up=randn(2 * i, h, std=h**-0.5),
        down=randn(h, i, std=i**-0.5),
        gate=expert_lora(h, i),
        up=expert_lora(h, i),
        down_lora=expert_lora(i, h),
        router=torch.randn(s, e, h, generator=gen, device=device) * h**-0.5,
        routing=routing,
        host_scale=host_scale,
    )


def make_batch(
    cfg: LayerConfig, tokens: int, dtype: torch.dtype, device: torch.device, seed: int = 1
) -> Batch:
    gen = torch.Generator(device=device).manual_seed(seed + tokens)
    x = torch.randn(tokens, cfg.hidden, generator=gen, device=device).to(dtype)
    index = torch.arange(tokens, device=device)
    return Batch(x=x, rows=index, slots=index % cfg.adapters)


def base_ffn(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """The base model's FFN alone: [T, H] -> [T, H]."""
    intermediate = layer.down.shape[1]
    gate_up = F.linear(x, layer.gate_up)  # [T, 2I]
    return F.linear(ACT(gate_up[:, :intermediate]) * gate_up[:, intermediate:], layer.down)


def mixserve_ffn(layer: Layer, batch: Batch) -> torch.Tensor:
    """mlp_forward's MixLoRA path: base gate/up once, route, moe_lora_ffn (segment building,
    expert LoRAs, act, weighted sum, routed down deltas), base down once. [T, H] -> [T, H]."""
    x, rows, slots = batch.x, batch.rows, batch.slots
    intermediate = layer.down.shape[1]
    gate_up = F.linear(x, layer.gate_up)  # [T, 2I]
    hidden = ACT(gate_up[:, :intermediate]) * gate_up[:, intermediate:]  # [T, I] non-MixLoRA rows
    weights = route(x.index_select(0, rows), slots, layer.router, layer.routing)  # [N, E]
    expert_hidden, down_delta = moe_lora_ffn(
        x, gate_up, rows, slots, weights, layer.gate, layer.up, layer.down_lora, ACT
    )  # [N, I], [N, H]
    hidden[rows] = expert_hidden  # h_bar = sum_e w_e h_e
    out = F.linear(hidden, layer.down)  # [T, H]
    out.index_add_(0, rows, down_delta)
    return out


def lora_pair_case(layer: Layer, batch: Batch) -> LoraPairCase:
    """Routing and segments of the step, built once (outside the timed region) and trimmed to
    the selected assignments (the device builder pads to N * E; moe_lora_ffn trims large ones)."""
    weights = route(batch.x.index_select(0, batch.rows), batch.slots, layer.router, layer.routing)
    local = torch.arange(batch.rows.shape[0], device=batch.x.device)
    segments = build_segments(weights, local, batch.slots, layer.gate.lora_a.shape[1]).trimmed()
    token_rows = batch.rows.index_select(0, segments.row_ids)  # [P]
    by_token = Segments(token_rows, segments.group_ids, segments.weights, segments.num_valid)
    out = torch.zeros(
        segments.row_ids.shape[0], 2 * layer.down.shape[1], dtype=batch.x.dtype,
        device=batch.x.device,
    )  # fmt: skip
    return LoraPairCase(
        by_token=by_token,
        segments=segments,
        out=out,
        groups=int(torch.unique(segments.group_ids).numel()),
        adapters=int(torch.unique(batch.slots).numel()),
    )


def run_lora_pair(layer: Layer, batch: Batch, case: LoraPairCase) -> None:
    """Routed gate/up shrink + expand, as moe_lora_ffn calls them: out[p] += scale B A x[t(p)]."""
    gate, up = layer.gate, layer.up
    intermediate = layer.down.shape[1]
    group_ids = case.segments.group_ids
    shrunk_gate, shrunk_up = lora_shrink_pair(
        batch.x, gate.lora_a.flatten(0, 1), up.lora_a.flatten(0, 1), case.by_token,
        gather_rows=True,
    )  # fmt: skip  # [P, r] each
    lora_expand_pair(
        shrunk_gate, shrunk_up, gate.lora_b.flatten(0, 1), up.lora_b.flatten(0, 1),
        case.segments, gate.scale[group_ids], up.scale[group_ids],
        case.out[:, :intermediate], case.out[:, intermediate:], scatter_rows=False,
    )  # fmt: skip


def lora_pair_cost(cfg: LayerConfig, case: LoraPairCase, tokens: int, itemsize: int) -> tuple:
    """(bytes, flops) the gate/up shrink + expand must at least move and compute: x once, the
    touched A/B of both projections once, the [P, 2I] output read and written."""
    assignments = case.segments.row_ids.shape[0]
    h, i, r = cfg.hidden, cfg.intermediate, cfg.rank
    moved = (tokens * h + case.groups * 2 * r * (h + i) + 2 * assignments * 2 * i) * itemsize
    return moved, 4 * assignments * r * (h + i)


def ffn_bytes_bound(cfg: LayerConfig, case: LoraPairCase, itemsize: int) -> float:
    """Lower bound on (MoE-LoRA FFN time / base FFN time) from weight bytes alone, which decide
    memory-bound decode steps: (base + touched expert LoRAs + routers) / base."""
    h, i, r = cfg.hidden, cfg.intermediate, cfg.rank
    base = 3 * h * i * itemsize
    lora = case.groups * 3 * r * (h + i) * itemsize
    routers = case.adapters * cfg.experts * h * 4
    return (base + lora + routers) / base
