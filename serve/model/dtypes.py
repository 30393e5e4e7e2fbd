"""Dtype names (as in configs and flags) to torch dtypes."""

from __future__ import annotations

import torch

from mixserve.config import canonical_dtype

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH[canonical_dtype(name)]
