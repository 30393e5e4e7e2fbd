"""The Segments message: assignments sorted by (slot, expert) group."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Segments:
    """Assignments sorted by group (stable, so rows keep their order inside a group)."""

    row_ids: torch.Tensor  # [P] int64: the routed row each assignment reads / writes
    group_ids: torch.Tensor  # [P] int64 non-decreasing: slot * E + expert
    weights: torch.Tensor  # [P] float32 routing weight (1 for plain LoRA)

    @property
    def num_assignments(self) -> int:
        return int(self.row_ids.shape[0])
