"""Routing rules and the per-slot routing settings the router op reads."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class RoutingRule(enum.IntEnum):
    NONE = 0
    TOP_K = 1
    TOP_P = 2
    SWITCH = 3
    DENSE = 4
    DYNMOLE = 5


@dataclass(frozen=True, slots=True)
class RoutingParams:
    """Routing settings per adapter slot; every tensor is [S] on the router's device."""

    rule: torch.Tensor  # int64, a RoutingRule value
    num_experts: torch.Tensor  # int64, experts actually present (<= E of the stacked router)
    top_k: torch.Tensor  # int64 (TOP_K)
    top_p: torch.Tensor  # float32 (TOP_P, DYNMOLE)
    temperature: torch.Tensor  # float32 (TOP_P; 0 = off)
    entropy_threshold: torch.Tensor  # float32 (DYNMOLE)
    entropy_index: torch.Tensor  # float32 q (DYNMOLE)
    entropy_renyi: torch.Tensor  # bool: Renyi instead of Tsallis (DYNMOLE)
    entropy_eps: torch.Tensor  # float32 (DYNMOLE)
    keep_top_k: torch.Tensor  # int64 (DYNMOLE)

    @staticmethod
    def empty(num_slots: int, device: torch.device | str = "cpu") -> RoutingParams:
        def ints() -> torch.Tensor:
            return torch.zeros(num_slots, dtype=torch.int64, device=device)

        def floats() -> torch.Tensor:
            return torch.zeros(num_slots, dtype=torch.float32, device=device)

        return RoutingParams(
            rule=ints(),
            num_experts=ints(),
            top_k=ints(),
            top_p=floats(),
            temperature=floats(),
            entropy_threshold=floats(),
            entropy_index=floats(),
            entropy_renyi=torch.zeros(num_slots, dtype=torch.bool, device=device),
            entropy_eps=floats(),
            keep_top_k=ints(),
        )
