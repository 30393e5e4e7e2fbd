"""An adapter read back out of its pool slot, for exclusive tiers (AdapterPager on CPU).

On CPU a slot is host memory as much as the host tier is. There the pager keeps an adapter
that sits in a slot only there (its host copy leaves), remembering a `skeleton` of its weights,
and reads it back into the host tier when the slot is about to be overwritten. `AdapterPool.load`
copies each tensor into a slice of the same shape (`AdapterPool.slot_views`, which `read_slot`
reads), so the slices are the adapter again, bit for bit, wherever the pool
stores every tensor in the adapter's own dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mixserve.adapters.exchange_files import fresh_copies
from mixserve.adapters.pool import AdapterPool
from mixserve.adapters.weights import AdapterWeights

_META = torch.device("meta")


def _meta(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device=_META)


def skeleton(weights: AdapterWeights) -> AdapterWeights:
    """The same adapter with every tensor on the meta device: shapes and dtypes, no data."""
    return weights.map_tensors(_meta)


def stored_exactly(pool: AdapterPool, weights: AdapterWeights) -> bool:
    """Whether the pool keeps every tensor of weights in its own dtype (a read-back is then the
    same bits); a bf16 pool holding an fp32 adapter, say, does not."""
    return all(tensor.dtype == stored.dtype for tensor, stored in pool.slot_views(0, weights))


def read_slot(
    pool: AdapterPool,
    slot: int,
    like: AdapterWeights,
    copy_out: Callable[[list[torch.Tensor]], list[torch.Tensor]] = fresh_copies,
) -> AdapterWeights:
    """The adapter in slot as host tensors, shaped like `like` (its skeleton, or the weights
    that were loaded there). copy_out makes the host copies of the slot's views (a load
    worker's spare exchange files: `ExchangeFiles.host_copies`). The caller checks
    `stored_exactly` before relying on the bits."""
    if pool.names[slot] != like.name:
        raise ValueError(f"slot {slot} holds {pool.names[slot]!r}, not {like.name!r}")
    # slot_views lists the tensors in the order map_tensors visits them.
    views = [stored for _, stored in pool.slot_views(slot, like)]
    copies = iter(copy_out(views))

    def copy(tensor: torch.Tensor) -> torch.Tensor:
        stored = next(copies)
        assert stored.shape == tensor.shape, "slot_views and map_tensors disagree"
        return stored

    return like.map_tensors(copy)
