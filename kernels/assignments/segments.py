"""The Segments message: assignments sorted by (slot, expert) group."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar, cast

import torch

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Segments:
    """Assignments sorted by group (stable, so rows keep their order inside a group)."""

    row_ids: torch.Tensor  # [P] int64: the routed row each assignment reads / writes
    group_ids: torch.Tensor  # [P] int64 non-decreasing: slot * E + expert
    weights: torch.Tensor  # [P] float32 routing weight (1 for plain LoRA)
    # Device-side builders keep P fixed (no host sync, CUDA-graph friendly): entries at and beyond
    # num_valid ([] int64 on the device) are padding and must be ignored. None: all are valid.
    num_valid: torch.Tensor | None = None
    # Host-side layouts derived from these tensors by the torch reference path, built on first use
    # and reused by every layer and site that shares the Segments (plain LoRA rows of a step).
    # So the tensors must not change in place once the Segments has been used.
    memo: dict[str, object] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_assignments(self) -> int:
        """Host-side count (syncs when num_valid is set; the reference path never sets it)."""
        if self.num_valid is not None:
            return int(self.num_valid)
        return int(self.row_ids.shape[0])

    def memoised(self, key: str, build: Callable[[], T]) -> T:
        """build()'s value (None included), built on the first call per key and kept in memo."""
        if key not in self.memo:
            self.memo[key] = build()
        return cast(T, self.memo[key])

    def subset(self, positions: torch.Tensor) -> Segments:
        """The assignments at positions ([P'] int64, ascending: the result stays sorted by
        group), as new Segments with an empty memo."""
        return Segments(
            self.row_ids.index_select(0, positions),
            self.group_ids.index_select(0, positions),
            self.weights.index_select(0, positions),
        )

    def trimmed(self) -> Segments:
        """The valid prefix as exact-size Segments (num_valid None); syncs when padded."""
        if self.num_valid is None:
            return self
        count = int(self.num_valid)
        return Segments(self.row_ids[:count], self.group_ids[:count], self.weights[:count])
