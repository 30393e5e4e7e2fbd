"""Flags of `mixserve serve`, each with an environment variable (MIXSERVE_*) as its default."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from typing import Any

from mixserve.config import (
    AdapterPoolConfig,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "m": 1e6,
    "g": 1e9,
    "t": 1e12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_bytes(value: str) -> int:
    """'512MiB', '4GiB', '1.5GB', '1048576' -> bytes."""
    match = _SIZE.match(value)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (e.g. 512MiB, 4GiB)")
    unit = (match.group(2) or "").lower().rstrip("b")
    return int(float(match.group(1)) * _UNITS[unit])


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value!r}")


def _add(
    group: Any,
    flag: str,
    env: str,
    *,
    type: Callable[[str], Any] = str,  # noqa: A002 - argparse's name
    default: Any = None,
    help: str,  # noqa: A002 - argparse's name
    append: bool = False,
) -> None:
    raw = os.environ.get(env)
    if append:  # env: paths separated by os.pathsep; flags add to them
        values = [type(p) for p in raw.split(os.pathsep) if p] if raw else []
        group.add_argument(
            flag, type=type, action="append", default=values, help=f"{help} [env {env}]"
        )
        return
    if raw is not None:
        default = type(raw)
    group.add_argument(flag, type=type, default=default, help=f"{help} [env {env}]")


def _add_switch(group: Any, flag: str, env: str, help: str) -> None:  # noqa: A002
    default = _flag(os.environ.get(env, "0"))
    group.add_argument(flag, action="store_true", default=default, help=f"{help} [env {env}]")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    _add(
        model,
        "--model",
        "MIXSERVE_MODEL",
        help="local HF model folder (default: the embedded SmolLM2-135M-Instruct)",
    )
    _add(
        model,
        "--served-model-name",
        "MIXSERVE_SERVED_MODEL_NAME",
        help="the base model's id in the API (default: the folder's name)",
    )
    _add(model, "--dtype", "MIXSERVE_DTYPE", default="float32", help="float32, bfloat16, float16")
    _add(model, "--device", "MIXSERVE_DEVICE", default="cpu", help="cpu or cuda[:N]")

    net = parser.add_argument_group("network and security")
    _add(net, "--host", "MIXSERVE_HOST", default="127.0.0.1", help="address to bind")
    _add(net, "--port", "MIXSERVE_PORT", type=int, default=8000, help="port")
    _add(net, "--api-key", "MIXSERVE_API_KEY", help="require 'Authorization: Bearer KEY' on /v1")
    _add(
        net,
        "--adapter-dir",
        "MIXSERVE_ADAPTER_DIRS",
        append=True,
        help="root folder whose subfolders are adapters served by name (repeatable; env: "
        "paths separated by the OS path separator)",
    )
    _add_switch(
        net,
        "--enable-adapter-loading",
        "MIXSERVE_ENABLE_ADAPTER_LOADING",
        "allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter",
    )
    _add_switch(
        net,
        "--no-demo-adapters",
        "MIXSERVE_NO_DEMO_ADAPTERS",
        "do not generate and serve the synthetic demo-* adapters",
    )

    mem = parser.add_argument_group("memory")
    _add(
        mem,
        "--kv-cache-memory",
        "MIXSERVE_KV_CACHE_MEMORY",
        type=parse_bytes,
        default=512 * 2**20,
        help="KV cache budget (e.g. 512MiB)",
    )
    _add(
        mem, "--block-size", "MIXSERVE_BLOCK_SIZE", type=int, default=16, help="tokens per KV block"
    )
    _add_switch(mem, "--no-prefix-caching", "MIXSERVE_NO_PREFIX_CACHING", "disable prefix caching")
    _add(
        mem,
        "--adapter-slots",
        "MIXSERVE_ADAPTER_SLOTS",
        type=int,
        help="adapter slots on the device (default: from the slot memory budget)",
    )
    _add(
        mem,
        "--adapter-slot-memory",
        "MIXSERVE_ADAPTER_SLOT_MEMORY",
        type=parse_bytes,
        help="memory for adapter slots (CPU default 1GiB)",
    )
    _add(
        mem,
        "--adapter-slot-memory-fraction",
        "MIXSERVE_ADAPTER_SLOT_MEMORY_FRACTION",
        type=float,
        help="or a fraction of free GPU memory for adapter slots",
    )
    _add(
        mem,
        "--host-cache-memory",
        "MIXSERVE_HOST_CACHE_MEMORY",
        type=parse_bytes,
        default=4 * 2**30,
        help="host-memory adapter cache (LRU)",
    )
    _add(
        mem,
        "--max-lora-rank",
        "MIXSERVE_MAX_LORA_RANK",
        type=int,
        default=16,
        help="largest rank a hot-loaded adapter may have",
    )
    _add(
        mem,
        "--max-experts",
        "MIXSERVE_MAX_EXPERTS",
        type=int,
        default=8,
        help="most experts per MLP site a hot-loaded adapter may have",
    )
    _add(
        mem,
        "--max-attn-experts",
        "MIXSERVE_MAX_ATTN_EXPERTS",
        type=int,
        default=1,
        help="most experts per attention site (MoLA/DynMoLE)",
    )

    limits = parser.add_argument_group("limits")
    _add(
        limits,
        "--max-num-seqs",
        "MIXSERVE_MAX_NUM_SEQS",
        type=int,
        default=64,
        help="sequences per step",
    )
    _add(
        limits,
        "--max-num-batched-tokens",
        "MIXSERVE_MAX_NUM_BATCHED_TOKENS",
        type=int,
        default=2048,
        help="tokens per step",
    )
    _add(limits, "--max-model-len", "MIXSERVE_MAX_MODEL_LEN", type=int, help="prompt + output")
    _add(
        limits,
        "--max-adapter-bypass",
        "MIXSERVE_MAX_ADAPTER_BYPASS",
        type=int,
        default=64,
        help="later requests of resident adapters that may pass one the adapter cap holds back",
    )
    _add(
        limits,
        "--max-prompt-tokens",
        "MIXSERVE_MAX_PROMPT_TOKENS",
        type=int,
        help="longest prompt accepted",
    )
    _add(
        limits,
        "--max-tokens-limit",
        "MIXSERVE_MAX_TOKENS_LIMIT",
        type=int,
        default=4096,
        help="largest max_tokens accepted",
    )
    _add(
        limits,
        "--max-queue",
        "MIXSERVE_MAX_QUEUE",
        type=int,
        default=256,
        help="open requests before 429",
    )
    _add(
        limits,
        "--max-body-size",
        "MIXSERVE_MAX_BODY_SIZE",
        type=parse_bytes,
        default=4 * 2**20,
        help="largest request body (413 above)",
    )
    _add(
        limits,
        "--drain-timeout",
        "MIXSERVE_DRAIN_TIMEOUT",
        type=float,
        default=30.0,
        help="seconds running requests get to finish on SIGTERM",
    )
    _add_switch(
        limits,
        "--expert-metrics",
        "MIXSERVE_EXPERT_METRICS",
        "export tokens routed per expert (bounded label cardinality)",
    )
    _add(
        limits,
        "--max-expert-metric-adapters",
        "MIXSERVE_MAX_EXPERT_METRIC_ADAPTERS",
        type=int,
        default=20,
        help="adapters with their own expert-metric labels; the rest count as 'other'",
    )


def configs_from_args(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    engine = EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype, device=args.device),
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_memory_bytes=args.kv_cache_memory,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
            max_adapter_bypass=args.max_adapter_bypass,
        ),
        adapters=AdapterPoolConfig(
            max_lora_rank=args.max_lora_rank,
            max_experts=args.max_experts,
            max_attn_experts=args.max_attn_experts,
            num_slots=args.adapter_slots,
            slot_memory_bytes=args.adapter_slot_memory,
            slot_memory_fraction=args.adapter_slot_memory_fraction,
            host_cache_bytes=args.host_cache_memory,
        ),
    )
    server = ServerConfig(
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        api_key=args.api_key or None,
        adapter_dirs=tuple(d for d in args.adapter_dir if d),
        enable_adapter_loading=args.enable_adapter_loading,
        demo_adapters=not args.no_demo_adapters,
        max_body_bytes=args.max_body_size,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit,
        max_queue=args.max_queue,
        drain_timeout_s=args.drain_timeout,
        expert_metrics=args.expert_metrics,
        max_expert_metric_adapters=args.max_expert_metric_adapters,
    )
    return engine, server
