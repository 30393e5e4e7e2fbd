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
from mixserve.adapters.loader import load_adapter
from mixserve.adapters.pool import AdapterPool, PoolShape
from mixserve.adapters.spec import AdapterFamily, AdapterSpec, SiteKind
from mixserve.adapters.weights import AdapterWeights

__all__ = [
    "AdapterCapacityError",
    "AdapterConfigError",
    "AdapterError",
    "AdapterFamily",
    "AdapterFileError",
    "AdapterNotFoundError",
    "AdapterPool",
    "AdapterShapeError",
    "AdapterSpec",
    "AdapterValueError",
    "AdapterWeights",
    "BaseModelMismatchError",
    "MissingTensorError",
    "PoolShape",
    "SiteKind",
    "UnexpectedTensorError",
    "UnknownRoutingStrategyError",
    "UnsupportedAdapterError",
    "load_adapter",
]
