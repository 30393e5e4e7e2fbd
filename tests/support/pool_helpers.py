"""Helpers for the AdapterPool tests: a pool shape that fits every family, and real tiny
adapters written and loaded in one call."""

from __future__ import annotations

from typing import Any

from mixserve.adapters import PoolShape, load_adapter
from mixserve.model import ArchConfig
from support.adapter_files import BaseDims, write_adapter
from support.tiny_models import tiny_config

DIMS = BaseDims.of(tiny_config("llama"))
FULL = PoolShape(16, 4, 4, attn_routers=True, mlp_routers=True, ffn_router=True)


def load_tiny(tmp_path: Any, arch: ArchConfig, strategy: str | None, name: str, **kw: Any):
    path = write_adapter(str(tmp_path / name), DIMS, strategy, **kw)
    return load_adapter(name, path, arch)
