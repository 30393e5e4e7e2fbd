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

FFN_ROUTER = "ffn_router"  # AdapterWeights.named_tensors' name of the MixLoRA FFN routers


def site_tensor_name(proj: str, part: str) -> str:
    """A site tensor's flat name: part is lora_a, lora_b, scale or router."""
    return f"{proj}.{part}"


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
        return list(self.named_tensors().values())

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor under its flat name (site_tensor_name, FFN_ROUTER), in the order
        map_tensors visits them."""
        named: dict[str, torch.Tensor] = {}
        for proj, site in self.sites.items():
            named[site_tensor_name(proj, "lora_a")] = site.lora_a
            named[site_tensor_name(proj, "lora_b")] = site.lora_b
            named[site_tensor_name(proj, "scale")] = site.scale
            if site.router is not None:
                named[site_tensor_name(proj, "router")] = site.router
        if self.ffn_router is not None:
            named[FFN_ROUTER] = self.ffn_router
        return named

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
