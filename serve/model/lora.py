"""Adapter deltas at projection sites: plain LoRA and plugin-MoE experts in one routed call per
site, or one call for sites that share their input rows (q/k/v)."""

from __future__ import annotations

import torch

from mixserve.kernels import (
    Segments,
    build_segments,
    concat_segments,
    lora_apply,
    lora_apply_joint,
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


def add_site_deltas(
    lora: LoraBatch, sites: tuple[str, ...], layer_idx: int, x: torch.Tensor, out: torch.Tensor
) -> None:
    """add_site_delta for sites that read the same x [T, in] and write side by side into out's
    columns (out [T, sum out_i]: q/k/v of a fused qkv projection), in that order. Where every
    one of them holds the same plain-LoRA rows (one Segments object) and the pool keeps their A
    in one storage (AdapterStacks.joint_lora_a), one joint call gathers and shrinks x once for
    all of them."""
    batches = [lora.sites.get(site) for site in sites]
    stacks = [lora.stacks.sites[site] for site in sites]
    first = batches[0]
    joint = lora.stacks.joint_lora_a.get(sites)
    if (
        joint is not None
        and first is not None
        and first.plain is not None
        and all(
            batch is not None and batch.routed_rows is None and batch.plain is first.plain
            for batch in batches
        )
    ):
        lora_apply_joint(
            x,
            joint[layer_idx],
            [stack.lora_b[layer_idx].flatten(0, 1) for stack in stacks],
            first.plain,
            out,
            group_scales=[stack.scale[layer_idx] for stack in stacks],
            group_ranks=[stack.group_ranks for stack in stacks],
        )
        return
    col = 0
    for site, stack in zip(sites, stacks, strict=True):
        width = stack.lora_b.shape[-2]
        add_site_delta(lora, site, layer_idx, x, out[:, col : col + width])
        col += width
