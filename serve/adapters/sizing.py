"""How many adapter slots fit a memory budget (bytes, or a fraction of the device's free memory).

`bytes_per_slot` mirrors `AdapterPool`'s allocation exactly (every tensor is ``[..., S, ...]``
with a fixed per-slot size), so ``num_slots * bytes_per_slot`` is what the pool will take.
"""

from __future__ import annotations

import torch

from mixserve.adapters.pool import PoolShape
from mixserve.kernels import RoutingParams
from mixserve.model.arch import PROJECTIONS, ArchConfig

_FP32 = 4
_INT64 = 8
_BOOL = 1


def bytes_per_slot(shape: PoolShape, arch: ArchConfig, dtype: torch.dtype) -> int:
    """Device bytes one slot of an `AdapterPool(arch, shape, S, dtype, ...)` takes."""
    elem = torch.empty((), dtype=dtype).element_size()
    layers, rank = arch.num_layers, shape.max_rank
    total = 0
    for proj in PROJECTIONS:
        experts = shape.experts(proj)
        in_f, out_f = arch.projection_shape(proj)
        total += layers * experts * rank * (in_f + out_f) * elem  # lora_a + lora_b
        total += layers * experts * _FP32  # scale
        if shape.has_router(proj):
            total += layers * experts * in_f * _FP32
        total += _INT64  # site_kinds
    if shape.ffn_router:
        total += layers * shape.mlp_experts * arch.hidden_size * _FP32
    total += _BOOL  # ffn_slots
    # Routing settings: one element per slot in each field, whatever the fields are.
    routing = RoutingParams.empty(1)
    total += sum(getattr(routing, f).nbytes for f in RoutingParams.__dataclass_fields__)
    return total


def num_slots_for_budget(
    shape: PoolShape,
    arch: ArchConfig,
    dtype: torch.dtype,
    budget_bytes: int,
    *,
    max_slots: int | None = None,
) -> int:
    """The most slots that fit budget_bytes (capped at max_slots); ValueError if not even one."""
    per_slot = bytes_per_slot(shape, arch, dtype)
    slots = budget_bytes // per_slot
    if slots < 1:
        raise ValueError(
            f"an adapter slot budget of {budget_bytes} bytes holds no slot of {per_slot} bytes "
            f"(max rank {shape.max_rank}, experts {shape.attn_experts}/{shape.mlp_experts})"
        )
    return int(slots if max_slots is None else min(slots, max_slots))


def slot_budget_bytes(
    device: torch.device | str,
    *,
    budget_bytes: int | None = None,
    fraction_of_free: float | None = None,
) -> int:
    """Resolve a slot budget given either in bytes or as a fraction of free device memory.

    The fraction form reads `torch.cuda.mem_get_info` and so is CUDA-only: on CPU there is no
    meaningful "free memory" to share with a KV cache, so a byte budget is required there.
    """
    if (budget_bytes is None) == (fraction_of_free is None):
        raise ValueError("give exactly one of budget_bytes and fraction_of_free")
    if budget_bytes is not None:
        if budget_bytes < 1:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        return budget_bytes
    assert fraction_of_free is not None
    if not 0.0 < fraction_of_free <= 1.0:
        raise ValueError(f"fraction_of_free must be in (0, 1], got {fraction_of_free}")
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"fraction_of_free needs a CUDA device (got {device}); give budget_bytes")
    free, _total = torch.cuda.mem_get_info(device)
    return int(free * fraction_of_free)
