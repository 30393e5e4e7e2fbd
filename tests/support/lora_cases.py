"""What the routed-LoRA op tests share (tests/kernels/test_lora_ops.py for the reference,
tests/kernels/triton/lora_triton_cases.py for Triton): dtypes with their tolerances, the ranks
mixed in one batch, and the shape of a test scenario."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]
# Relative to the largest expected magnitude.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}
RANKS = [4, 8, 16, 32, 64]


@dataclass(frozen=True)
class Scenario:
    num_tokens: int
    num_slots: int
    num_experts: int
    hidden: int  # K
    out_features: int  # N_out
    max_fanout: int  # experts per token, 1..max_fanout
    used_groups: tuple[int, ...] | None = None  # restrict assignments to these groups

    @property
    def num_groups(self) -> int:
        return self.num_slots * self.num_experts
