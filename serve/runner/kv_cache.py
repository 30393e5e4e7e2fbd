"""The paged KV cache tensors, owned by the runner."""

from __future__ import annotations

import torch

from mixserve.model.arch import ArchConfig


def bytes_per_block(arch: ArchConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * arch.num_layers * block_size * arch.num_kv_heads * arch.head_dim * element


def num_blocks_for_budget(
    arch: ArchConfig, block_size: int, dtype: torch.dtype, budget_bytes: int
) -> int:
    return budget_bytes // bytes_per_block(arch, block_size, dtype)


def allocate_kv_cache(
    arch: ArchConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (K, V), each [num_blocks, block_size, num_kv_heads, head_dim]."""
    if num_blocks < 1 or block_size < 1:
        raise ValueError(
            f"need at least one block of at least one token (got {num_blocks} x {block_size})"
        )
    shape = (num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
    return [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(arch.num_layers)
    ]
