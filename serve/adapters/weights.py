"""AdapterWeights: one canonical, validated form for every adapter family.

Per projection site, A/B of all layers and experts are stacked (rank zero-padded to the site's
largest rank), which is the layout the slot pool copies from in one pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from mixserve.adapters.files import AdapterFiles
from mixserve.adapters.spec import AdapterSpec, SiteKind


@dataclass(frozen=True, slots=True)
class SiteWeights:
    kind: SiteKind
    lora_a: torch.Tensor  # [L, E, R, in] float32
    lora_b: torch.Tensor  # [L, E, out, R] float32
    scale: torch.Tensor  # [L, E] float32; 0 in layers the adapter does not adapt
    router: torch.Tensor | None  # [L, E, in] float32 (ROUTED sites)

    @property
    def num_experts(self) -> int:
        return int(self.lora_a.shape[1])

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[2])


@dataclass(frozen=True, slots=True)
class AdapterWeights:
    spec: AdapterSpec
    sites: Mapping[str, SiteWeights]  # targeted projections only
    ffn_router: torch.Tensor | None  # [L, E, hidden] float32 (MixLoRA)
    files: AdapterFiles

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor, in the order map_tensors visits them."""
        out = []
        for site in self.sites.values():
            out += [site.lora_a, site.lora_b, site.scale]
            if site.router is not None:
                out.append(site.router)
        if self.ffn_router is not None:
            out.append(self.ffn_router)
        return out

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AdapterWeights:
        """The same adapter with fn applied to every tensor (pinning, moving, copying)."""
        sites = {
            proj: dataclasses.replace(
                site,
                lora_a=fn(site.lora_a),
                lora_b=fn(site.lora_b),
                scale=fn(site.scale),
                router=None if site.router is None else fn(site.router),
            )
            for proj, site in self.sites.items()
        }
        router = None if self.ffn_router is None else fn(self.ffn_router)
        return dataclasses.replace(self, sites=sites, ffn_router=router)
