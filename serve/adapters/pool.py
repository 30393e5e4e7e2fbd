"""AdapterPool: fixed slots of stacked adapter tensors that one forward pass gathers from.

Every site tensor is ``[L, S, E, ...]``: slot s holds one adapter (any family), zero-padded to the
pool's rank and expert count. The pool's shape is fixed at creation; an adapter larger than it is
refused before its slot is touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mixserve.adapters.errors import AdapterCapacityError, BaseModelMismatchError
from mixserve.adapters.spec import AdapterFamily, AdapterSpec, SiteKind
from mixserve.adapters.weights import AdapterWeights
from mixserve.kernels import RoutingParams, RoutingRule
from mixserve.model.arch import ATTENTION_PROJECTIONS, PROJECTIONS, ArchConfig
from mixserve.model.context import AdapterStacks, SiteStack

RANK_ALIGNMENT = 8  # keeps every stacked row 16-byte aligned for bf16/fp16 grouped GEMMs
# Sites whose input is the layer's hidden state, read by all of them: one A storage per tuple.
JOINT_A_SITES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True, slots=True)
class PoolShape:
    max_rank: int
    attn_experts: int  # E of the q/k/v/o sites
    mlp_experts: int  # E of the gate/up/down sites and the MixLoRA router
    attn_routers: bool  # plugin-MoE routers on attention sites (MoLA, DynMoLE)
    mlp_routers: bool  # plugin-MoE routers on MLP sites (LoRAMoE, MoLA, DynMoLE)
    ffn_router: bool  # MixLoRA routers

    def __post_init__(self) -> None:
        if self.max_rank < 1 or self.max_rank % RANK_ALIGNMENT:
            raise ValueError(f"max_rank must be a positive multiple of {RANK_ALIGNMENT}")
        if self.attn_experts < 1 or self.mlp_experts < 1:
            raise ValueError("expert counts must be >= 1")

    @staticmethod
    def covering(
        specs: Iterable[AdapterSpec], num_layers: int, *, min_rank: int = RANK_ALIGNMENT
    ) -> PoolShape:
        """The smallest shape that holds every given adapter."""
        rank, attn_e, mlp_e = min_rank, 1, 1
        attn_routers = mlp_routers = ffn_router = False
        for spec in specs:
            for proj in spec.target_modules:
                rank = max(rank, spec.max_rank(proj, num_layers))
                routed = spec.site_kind(proj) is SiteKind.ROUTED
                if proj in ATTENTION_PROJECTIONS:
                    attn_e = max(attn_e, spec.site_experts(proj))
                    attn_routers |= routed
                else:
                    mlp_e = max(mlp_e, spec.site_experts(proj))
                    mlp_routers |= routed
            if spec.family is AdapterFamily.MIXLORA:
                mlp_e = max(mlp_e, spec.num_experts)
                ffn_router = True
        return PoolShape(
            _round_up(rank, RANK_ALIGNMENT), attn_e, mlp_e, attn_routers, mlp_routers, ffn_router
        )

    def experts(self, projection: str) -> int:
        return self.attn_experts if projection in ATTENTION_PROJECTIONS else self.mlp_experts

    def has_router(self, projection: str) -> bool:
        return self.attn_routers if projection in ATTENTION_PROJECTIONS else self.mlp_routers

    def check_fits(self, weights: AdapterWeights) -> None:
        spec = weights.spec
        for proj, site in weights.sites.items():
            if site.rank > self.max_rank:
                raise AdapterCapacityError(
                    spec.name,
                    f"{proj}: rank {site.rank} exceeds the pool's max rank {self.max_rank}",
                )
            if site.num_experts > self.experts(proj):
                raise AdapterCapacityError(
                    spec.name,
                    f"{proj}: {site.num_experts} experts exceed the pool's {self.experts(proj)}",
                )
            if site.router is not None and not self.has_router(proj):
                raise AdapterCapacityError(
                    spec.name, f"{proj}: the pool holds no routers at this site"
                )
        if weights.ffn_router is not None and (
            not self.ffn_router or spec.num_experts > self.mlp_experts
        ):
            raise AdapterCapacityError(spec.name, "the pool holds no MixLoRA router of this size")


class AdapterPool:
    """Slot tensors plus per-slot routing settings; slot contents change only via load/clear."""

    def __init__(
        self,
        arch: ArchConfig,
        shape: PoolShape,
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        self.arch, self.shape, self.num_slots = arch, shape, num_slots
        self.dtype, self.device = dtype, torch.device(device)
        layers, rank = arch.num_layers, shape.max_rank
        self._sites: dict[str, SiteStack] = {}
        zeros = {"dtype": dtype, "device": self.device}
        # Sites that read the same rows keep their A in one [.., in, n, R] storage, so a CPU
        # shrink reads x once for all of them (kernels.joint_lora_a). gate/up always: the MoE
        # FFN's joint shrink reads both. q/k/v on CPU only: the Triton path shrinks each site on
        # its own, and a 3R row stride would cost it bandwidth (not measured on a GPU yet).
        joint_a: dict[str, torch.Tensor] = {}
        joint_views: dict[tuple[str, ...], torch.Tensor] = {}
        for group in JOINT_A_SITES:
            if len(group) > 2 and self.device.type != "cpu":
                continue
            experts = shape.experts(group[0])
            storage = torch.zeros(
                layers, num_slots, experts, arch.hidden_size, len(group), rank, **zeros
            )
            joint_a.update({proj: storage[..., i, :] for i, proj in enumerate(group)})
            # [L, S * E, n R, in]: as joint_lora_a builds it from the sites' [.., R, in] views
            joint_views[group] = storage.flatten(1, 2).flatten(-2).mT
        for proj in PROJECTIONS:
            experts = shape.experts(proj)
            in_f, out_f = arch.projection_shape(proj)
            lora_a = joint_a.get(proj)
            if lora_a is None:
                lora_a = torch.zeros(layers, num_slots, experts, in_f, rank, **zeros)
            router = None
            if shape.has_router(proj):
                router = torch.zeros(
                    layers, num_slots, experts, in_f, dtype=torch.float32, device=self.device
                )
            self._sites[proj] = SiteStack(
                # A stored [.., in, R], exposed as the [.., R, in] view: on CPU a shrink of one
                # row by one group is then a weighted sum of `in` contiguous R-wide rows, which
                # embedding_bag runs for any number of groups in one call
                # (kernels/_rank_bags.py).
                lora_a=lora_a.mT,
                # B stored [.., R, out], exposed as the [.., out, R] view: expands read B along
                # `out` contiguously (CPU batched GEMMs with R innermost ran 2x slower; on GPU
                # the expand's [R, BLOCK_N] tiles become contiguous rows).
                lora_b=torch.zeros(layers, num_slots, experts, rank, out_f, **zeros).mT,
                scale=torch.zeros(
                    layers, num_slots * experts, dtype=torch.float32, device=self.device
                ),
                router=router,
                group_ranks=torch.zeros(num_slots * experts, dtype=torch.int32, device=self.device),
            )
        self._ffn_router = None
        if shape.ffn_router:
            self._ffn_router = torch.zeros(
                layers,
                num_slots,
                shape.mlp_experts,
                arch.hidden_size,
                dtype=torch.float32,
                device=self.device,
            )
        self.routing = RoutingParams.empty(num_slots, self.device)
        # Per slot: how each site is used ([S] int64 on device, SiteKind values), MixLoRA flag and
        # expert activation, and the adapter's name (host side).
        self.site_kinds = {
            p: torch.zeros(num_slots, dtype=torch.int64, device=self.device) for p in PROJECTIONS
        }
        self.ffn_slots = torch.zeros(num_slots, dtype=torch.bool, device=self.device)
        self.activations: list[str | None] = [None] * num_slots
        self.names: list[str | None] = [None] * num_slots
        self.stacks = AdapterStacks(
            sites=self._sites,
            ffn_router=self._ffn_router,
            routing=self.routing,
            joint_lora_a=joint_views,
        )

    def clear(self, slot: int, overwritten_by: AdapterWeights | None = None) -> None:
        """Zero a slot. A site whose A and B the adapter overwritten_by is about to copy in
        whole (every expert, the full rank) keeps them: zeroing ~28 MB first doubles a load."""
        for proj, stack in self._sites.items():
            site = overwritten_by.sites.get(proj) if overwritten_by is not None else None
            full = (stack.num_experts, int(stack.lora_a.shape[3]))  # every expert, the pool rank
            if site is None or (site.num_experts, site.rank) != full:
                stack.lora_a[:, slot].zero_()
                stack.lora_b[:, slot].zero_()
            experts = stack.num_experts
            stack.scale[:, slot * experts : (slot + 1) * experts] = 0
            stack.group_ranks[slot * experts : (slot + 1) * experts] = 0
            if stack.router is not None:
                stack.router[:, slot].zero_()
            self.site_kinds[proj][slot] = int(SiteKind.NONE)
        if self._ffn_router is not None:
            self._ffn_router[:, slot].zero_()
        self.ffn_slots[slot] = False
        for field in RoutingParams.__dataclass_fields__:
            getattr(self.routing, field)[slot] = 0
        self.activations[slot] = None
        self.names[slot] = None

    def _check_base_model(self, weights: AdapterWeights) -> None:
        """The adapter was validated against this pool's base model (layers and sizes agree)."""
        arch = self.arch
        for proj, site in weights.sites.items():
            in_f, out_f = arch.projection_shape(proj)
            layers, _, _, got_in = site.lora_a.shape
            got_out = site.lora_b.shape[2]
            if (layers, got_in, got_out) != (arch.num_layers, in_f, out_f):
                raise BaseModelMismatchError(
                    weights.name,
                    f"{proj}: built for {layers} layers of {got_in}->{got_out}, the pool's base "
                    f"model has {arch.num_layers} layers of {in_f}->{out_f}",
                    file=weights.files.weights_path,
                )
        router = weights.ffn_router
        if router is not None and (router.shape[0], router.shape[2]) != (
            arch.num_layers,
            arch.hidden_size,
        ):
            raise BaseModelMismatchError(
                weights.name,
                f"MixLoRA router built for {router.shape[0]} layers of hidden size "
                f"{router.shape[2]}, the pool's base model has {arch.num_layers} x "
                f"{arch.hidden_size}",
                file=weights.files.weights_path,
            )

    def check_loadable(self, slot: int, weights: AdapterWeights) -> None:
        """Raise what `load` would refuse weights for, touching nothing."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.num_slots})")
        self._check_base_model(weights)
        self.shape.check_fits(weights)

    def slot_views(
        self, slot: int, weights: AdapterWeights
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(a tensor of weights, the slice of slot that holds it) pairs, each slice the tensor's
        shape, in the order AdapterWeights.map_tensors visits the tensors: where `load` copies
        to, and where slot_readback reads from."""
        pairs = []
        for proj, site in weights.sites.items():
            stack = self._sites[proj]
            num_e, rank = site.num_experts, site.rank
            first = slot * stack.num_experts
            pairs += [
                (site.lora_a, stack.lora_a[:, slot, :num_e, :rank]),  # [L, E, R, in]
                (site.lora_b, stack.lora_b[:, slot, :num_e, :, :rank]),  # [L, E, out, R]
                (site.scale, stack.scale[:, first : first + num_e]),  # [L, E]
            ]
            if site.router is not None:
                assert stack.router is not None
                pairs.append((site.router, stack.router[:, slot, :num_e]))  # [L, E, in]
        if weights.ffn_router is not None:
            assert self._ffn_router is not None
            router = self._ffn_router[:, slot, : weights.spec.num_experts]  # [L, E, hidden]
            pairs.append((weights.ffn_router, router))
        return pairs

    def load(self, slot: int, weights: AdapterWeights) -> None:
        """Copy a validated adapter into a slot (refused, slot untouched, if it does not fit)."""
        self.check_loadable(slot, weights)
        self.clear(slot, overwritten_by=weights)
        spec = weights.spec
        for tensor, target in self.slot_views(slot, weights):
            target.copy_(tensor)
        for proj, site in weights.sites.items():
            stack = self._sites[proj]
            first = slot * stack.num_experts
            stack.group_ranks[first : first + site.num_experts] = site.rank
            self.site_kinds[proj][slot] = int(site.kind)
        if weights.ffn_router is not None:
            self.ffn_slots[slot] = True
            self.activations[slot] = spec.act_fn or self.arch.hidden_act
        r = self.routing
        r.rule[slot] = int(spec.rule) if spec.rule is not RoutingRule.NONE else 0
        r.num_experts[slot] = spec.num_experts
        r.top_k[slot] = spec.top_k
        r.top_p[slot] = spec.top_p
        r.temperature[slot] = spec.temperature
        r.entropy_threshold[slot] = spec.entropy_threshold
        r.entropy_index[slot] = spec.entropy_index
        r.entropy_renyi[slot] = spec.entropy_renyi
        r.entropy_eps[slot] = spec.entropy_eps
        r.keep_top_k[slot] = spec.keep_top_k
        self.names[slot] = spec.name
