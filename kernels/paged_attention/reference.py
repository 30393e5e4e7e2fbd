"""Pure-torch paged attention: decode rows in one batched call, prefill chunks one by one."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """[..., nb] block ids -> [..., nb * BS, Hkv, D] cached rows in position order."""
    # index_select over the flat ids copies whole blocks ~25% faster on CPU than cache[block_ids]
    rows = cache.index_select(0, block_ids.reshape(-1))  # [... * nb, BS, Hkv, D]
    return rows.view(*block_ids.shape[:-1], -1, *cache.shape[2:])


def _visible(
    positions: torch.Tensor, seq_lens: torch.Tensor, num_keys: int, sliding_window: int | None
) -> torch.Tensor:
    """[B, Q, L] bool: key j visible to the query at positions[b, q]."""
    keys = torch.arange(num_keys, device=positions.device)
    visible = (keys[None, None, :] <= positions[:, :, None]) & (
        keys[None, None, :] < seq_lens[:, None, None]
    )
    if sliding_window is not None:
        visible &= keys[None, None, :] > positions[:, :, None] - sliding_window
    return visible


def _attend(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [B, Q, Hq, D], keys/values [B, L, Hkv, D], visible [B, Q, L] -> [B, Q, Hq, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        keys.transpose(1, 2).to(q.dtype),
        values.transpose(1, 2).to(q.dtype),
        attn_mask=visible[:, None, :, :],
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: list[int],
    seq_lens: list[int],
    *,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    block_size = k_cache.shape[1]
    device = q.device
    out = torch.empty_like(q)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)

    decode = [b for b, n in enumerate(query_lens) if n == 1]
    if decode:
        lens = torch.tensor([seq_lens[b] for b in decode], device=device)
        num_blocks = -(-max(seq_lens[b] for b in decode) // block_size)
        tables = block_tables[decode, :num_blocks].to(device=device, dtype=torch.long)
        keys, values = _gather(k_cache, tables), _gather(v_cache, tables)
        rows = torch.tensor([starts[b] for b in decode], device=device)
        positions = (lens - 1)[:, None]
        visible = _visible(positions, lens, keys.shape[1], sliding_window)
        out[rows] = _attend(q[rows][:, None], keys, values, visible, scale)[:, 0]

    for b, num_queries in enumerate(query_lens):
        if num_queries <= 1:
            continue
        seq_len = seq_lens[b]
        num_blocks = -(-seq_len // block_size)
        table = block_tables[b, :num_blocks].to(device=device, dtype=torch.long)
        keys = _gather(k_cache, table)[None, :seq_len]
        values = _gather(v_cache, table)[None, :seq_len]
        positions = torch.arange(seq_len - num_queries, seq_len, device=device)[None, :]
        lens = torch.tensor([seq_len], device=device)
        visible = _visible(positions, lens, seq_len, sliding_window)
        rows = slice(starts[b], starts[b + 1])
        out[rows] = _attend(q[rows][None], keys, values, visible, scale)[0]
    return out
