"""Per-step adapter metadata: from each token's slot to the rows every site must handle."""

from __future__ import annotations

import torch

from mixserve.adapters.pool import AdapterPool
from mixserve.adapters.spec import SiteKind
from mixserve.kernels import Segments
from mixserve.model.context import FfnBatch, LoraBatch, SiteBatch


def _plain_segments(rows: torch.Tensor, slots: torch.Tensor, num_experts: int) -> Segments:
    group_ids = slots * num_experts  # expert 0
    order = torch.argsort(group_ids, stable=True)
    return Segments(
        row_ids=rows[order],
        group_ids=group_ids[order],
        weights=torch.ones(rows.shape[0], dtype=torch.float32, device=rows.device),
    )


def build_lora_batch(
    pool: AdapterPool, token_slots: torch.Tensor, *, count_experts: bool = False
) -> LoraBatch | None:
    """token_slots [T] int64 (-1 = no adapter) -> LoraBatch, or None when no token has an adapter.

    Plain-LoRA segments do not depend on the layer, so they are built once per step here; routed
    sites only get their rows, since routing depends on each layer's activations.
    """
    has_adapter = token_slots >= 0
    if not bool(has_adapter.any()):
        return None
    rows_all = torch.nonzero(has_adapter, as_tuple=True)[0]
    slots_all = token_slots[rows_all]
    sites: dict[str, SiteBatch] = {}
    # Sites with the same plain rows and expert count share one Segments object: its layouts are
    # built once, and joint sites (q/k/v) recognise each other by it.
    built: list[tuple[torch.Tensor, int, Segments]] = []
    for proj, kinds in pool.site_kinds.items():
        kind = kinds[slots_all]
        plain_mask = kind == int(SiteKind.LORA)
        routed_mask = kind == int(SiteKind.ROUTED)
        plain = routed_rows = routed_slots = None
        if bool(plain_mask.any()):
            experts = pool.stacks.sites[proj].num_experts
            plain = next(
                (seg for mask, e, seg in built if e == experts and torch.equal(mask, plain_mask)),
                None,
            )
            if plain is None:
                plain = _plain_segments(rows_all[plain_mask], slots_all[plain_mask], experts)
                built.append((plain_mask, experts, plain))
        if bool(routed_mask.any()):
            routed_rows, routed_slots = rows_all[routed_mask], slots_all[routed_mask]
        if plain is not None or routed_rows is not None:
            sites[proj] = SiteBatch(plain=plain, routed_rows=routed_rows, routed_slots=routed_slots)
    ffn = None
    ffn_mask = pool.ffn_slots[slots_all]
    if bool(ffn_mask.any()):
        ffn_slots = slots_all[ffn_mask]
        by_activation: dict[str, list[int]] = {}
        for slot in torch.unique(ffn_slots).tolist():
            activation = pool.activations[slot]
            assert activation is not None
            by_activation.setdefault(activation, []).append(slot)
        activations = tuple(
            (name, torch.tensor(slots, dtype=torch.int64, device=token_slots.device))
            for name, slots in by_activation.items()
        )
        ffn = FfnBatch(rows=rows_all[ffn_mask], slots=ffn_slots, activations=activations)
    counts = None
    if count_experts:
        width = max(pool.shape.attn_experts, pool.shape.mlp_experts)
        counts = torch.zeros(pool.num_slots, width, dtype=torch.int64, device=token_slots.device)
    return LoraBatch(stacks=pool.stacks, sites=sites, ffn=ffn, expert_counts=counts)
