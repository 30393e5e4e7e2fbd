"""Adapter formats (MoE-PEFT families, PEFT LoRA), validation and the slot pool."""

from __future__ import annotations

from mixserve.adapters.errors import (
    AdapterCapacityError,
    AdapterConfigError,
    AdapterError,
    AdapterFileError,
    AdapterNotFoundError,
    AdapterShapeError,
    AdapterValueError,
    BaseModelMismatchError,
    MissingTensorError,
    UnexpectedTensorError,
    UnknownRoutingStrategyError,
    UnsupportedAdapterError,
)
from mixserve.adapters.host_cache import HostCache, HostCacheStats
from mixserve.adapters.loader import load_adapter
from mixserve.adapters.loads import AdapterLoadResult, adapter_uid
from mixserve.adapters.pager import AdapterPager
from mixserve.adapters.pager_state import AdapterState, PagerStats
from mixserve.adapters.pool import AdapterPool, PoolShape
from mixserve.adapters.sizing import bytes_per_slot, num_slots_for_budget, slot_budget_bytes
from mixserve.adapters.spec import AdapterFamily, AdapterSpec, SiteKind
from mixserve.adapters.weights import AdapterWeights

__all__ = [
    "AdapterCapacityError",
    "AdapterConfigError",
    "AdapterError",
    "AdapterFamily",
    "AdapterFileError",
    "AdapterLoadResult",
    "AdapterNotFoundError",
    "AdapterPager",
    "AdapterPool",
    "AdapterShapeError",
    "AdapterSpec",
    "AdapterState",
    "AdapterValueError",
    "AdapterWeights",
    "BaseModelMismatchError",
    "HostCache",
    "HostCacheStats",
    "MissingTensorError",
    "PagerStats",
    "PoolShape",
    "SiteKind",
    "UnexpectedTensorError",
    "UnknownRoutingStrategyError",
    "UnsupportedAdapterError",
    "adapter_uid",
    "bytes_per_slot",
    "load_adapter",
    "num_slots_for_budget",
    "slot_budget_bytes",
]
