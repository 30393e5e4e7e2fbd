"""Attention over a paged KV cache for a flattened batch of prefill chunks and decode tokens.

Cache layout: per layer one K and one V tensor ``[num_blocks, block_size, num_kv_heads,
head_dim]``; a sequence's token at position j lives in block ``block_tables[b, j // block_size]``
at offset ``j % block_size`` (flat slot ``block * block_size + offset``).
"""

from __future__ import annotations

import torch

from mixserve.kernels._dispatch import use_triton
from mixserve.kernels.paged_attention import reference


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store this step's keys and values: ``cache.flat[slot_mapping[t]] = k[t]`` (and v).

    Shapes: k, v [T, Hkv, D]; caches [NB, BS, Hkv, D]; slot_mapping [T] int64.
    """
    if use_triton(k_cache):
        # Imported on first use: triton reads TRITON_INTERPRET when the kernels are defined.
        from mixserve.kernels.paged_attention import triton as triton_impl

        triton_impl.write_kv(k, v, k_cache, v_cache, slot_mapping)
        return
    reference.write_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: list[int],
    seq_lens: list[int],
    *,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached keys (GQA).

    Semantics: sequence b owns rows ``[sum(query_lens[:b]), +query_lens[b])`` of q; its queries
    sit at positions ``seq_lens[b] - query_lens[b] + i`` and attend to cached positions
    ``j <= pos`` (and ``j > pos - sliding_window`` when set), softmax in float32.

    Shapes: q [T, Hq, D]; caches [NB, BS, Hkv, D] with Hq % Hkv == 0; block_tables [B, MB]
    int; query_lens, seq_lens: B host ints. Returns [T, Hq, D] in q's dtype.
    """
    if use_triton(q):
        from mixserve.kernels.paged_attention import triton as triton_impl

        return triton_impl.paged_attention(
            q,
            k_cache,
            v_cache,
            block_tables,
            query_lens,
            seq_lens,
            scale=scale,
            sliding_window=sliding_window,
        )
    return reference.paged_attention(
        q,
        k_cache,
        v_cache,
        block_tables,
        query_lens,
        seq_lens,
        scale=scale,
        sliding_window=sliding_window,
    )


__all__ = ["paged_attention", "write_kv"]
