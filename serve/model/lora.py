"""Adapter deltas at one projection site: plain LoRA and plugin-MoE experts in one routed call."""

from __future__ import annotations

import torch

from mixserve.kernels import (
    Segments,
    build_segments,
    concat_segments,
    lora_apply,
    route,
)
from mixserve.model.context import LoraBatch, count_routed


def site_segments(lora: LoraBatch, site: str, layer_idx: int, x: torch.Tensor) -> Segments | None:
    """This layer's assignments at a site: the step's plain-LoRA rows plus freshly routed rows."""
    batch = lora.sites.get(site)
    if batch is None:
        return None
    routed = None
    if batch.routed_rows is not None:
        stack = lora.stacks.sites[site]
        assert stack.router is not None, f"{site}: routed rows but no router stack"
        weights = route(
            x.index_select(0, batch.routed_rows),
            batch.routed_slots,
            stack.router[layer_idx],
            lora.stacks.routing,
            batch.routing_memo,
        )  # [N, E]
        count_routed(lora, batch.routed_slots, weights)
        routed = build_segments(weights, batch.routed_rows, batch.routed_slots, stack.num_experts)
    if batch.plain is None:
        return routed
    if routed is None:
        return batch.plain
    return concat_segments(batch.plain, routed)


def add_site_delta(
    lora: LoraBatch, site: str, layer_idx: int, x: torch.Tensor, out: torch.Tensor
) -> None:
    """out[t] += sum_e w_e(t) * scale_e * B_e A_e x[t] for every row routed to this site.

    x [T, in]; out [T, out_features] (may be a column slice of a fused projection).
    """
    segments = site_segments(lora, site, layer_idx, x)
    # A padded (device-built) list may be empty too; the kernels mask it, and asking for its
    # length here would cost a host sync per site per layer.
    if segments is None or (segments.num_valid is None and segments.num_assignments == 0):
        return
    stack = lora.stacks.sites[site]
    lora_a = stack.lora_a[layer_idx].flatten(0, 1)  # [S*E, R, in]
    lora_b = stack.lora_b[layer_idx].flatten(0, 1)  # [S*E, out, R]
    lora_apply(
        x,
        lora_a,
        lora_b,
        segments,
        None,
        out,
        group_ranks=stack.group_ranks,
        group_scale=stack.scale[layer_idx],
    )
