"""mixserve.kernels: fused ops for routed LoRA experts and paged attention.

Every op is a wrapper (semantics and shapes in its docstring) over a pure-torch reference; Triton
implementations plug in behind the same wrappers, and on CPU compiled C++ kernels where this
machine builds them (kernels/_cpu_build.py). This package imports torch (and triton) only, never
the rest of mixserve.
"""

from __future__ import annotations

from mixserve.kernels import _cpu_build, _dispatch
from mixserve.kernels.assignments import Segments, build_segments, concat_segments
from mixserve.kernels.lora import (
    joint_lora_a,
    lora_apply,
    lora_apply_joint,
    lora_expand,
    lora_expand_pair,
    lora_shrink,
    lora_shrink_pair,
)
from mixserve.kernels.moe_lora_ffn import ExpertLora, moe_lora_ffn
from mixserve.kernels.paged_attention import paged_attention, write_kv
from mixserve.kernels.routing import RoutingParams, RoutingRule, route


def prepare_cpu_kernels() -> bool:
    """Build (or load from the cache) the compiled CPU kernels now, not in the first step that
    needs them (a first build takes ~20 s); True where they run on this machine."""
    if _dispatch.mode() not in ("auto", "cpu"):
        return False
    return _cpu_build.module() is not None


__all__ = [
    "ExpertLora",
    "RoutingParams",
    "RoutingRule",
    "Segments",
    "build_segments",
    "concat_segments",
    "joint_lora_a",
    "lora_apply",
    "lora_apply_joint",
    "lora_expand",
    "lora_expand_pair",
    "lora_shrink",
    "lora_shrink_pair",
    "moe_lora_ffn",
    "paged_attention",
    "prepare_cpu_kernels",
    "route",
    "write_kv",
]
