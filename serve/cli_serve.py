"""Flags of `mixserve serve`, each with an environment variable (MIXSERVE_*) as its default."""

from __future__ import annotations

import argparse

from mixserve.cli_options import add_option, add_switch, parse_bytes
from mixserve.config import (
    AdapterPoolConfig,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    add_option(
        model,
        "--model",
        "MIXSERVE_MODEL",
        help="local HF model folder (default: the embedded SmolLM2-135M-Instruct)",
    )
    add_option(
        model,
        "--served-model-name",
        "MIXSERVE_SERVED_MODEL_NAME",
        help="the base model's id in the API (default: the folder's name)",
    )
    add_option(
        model, "--dtype", "MIXSERVE_DTYPE", default="float32", help="float32, bfloat16, float16"
    )
    add_option(model, "--device", "MIXSERVE_DEVICE", default="cpu", help="cpu or cuda[:N]")

    net = parser.add_argument_group("network and security")
    add_option(net, "--host", "MIXSERVE_HOST", default="127.0.0.1", help="address to bind")
    add_option(net, "--port", "MIXSERVE_PORT", type=int, default=8000, help="port")
    add_option(
        net, "--api-key", "MIXSERVE_API_KEY", help="require 'Authorization: Bearer KEY' on /v1"
    )
    add_option(
        net,
        "--adapter-dir",
        "MIXSERVE_ADAPTER_DIRS",
        append=True,
        help="root folder whose subfolders are adapters served by name (repeatable; env: "
        "paths separated by the OS path separator)",
    )
    add_switch(
        net,
        "--enable-adapter-loading",
        "MIXSERVE_ENABLE_ADAPTER_LOADING",
        "allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter",
    )
    add_switch(
        net,
        "--no-demo-adapters",
        "MIXSERVE_NO_DEMO_ADAPTERS",
        "do not generate and serve the synthetic demo-* adapters",
    )

    mem = parser.add_argument_group("memory")
    add_option(
        mem,
        "--kv-cache-memory",
        "MIXSERVE_KV_CACHE_MEMORY",
        type=parse_bytes,
        default=512 * 2**20,
        help="KV cache budget (e.g. 512MiB)",
    )
    add_option(
        mem, "--block-size", "MIXSERVE_BLOCK_SIZE", type=int, default=16, help="tokens per KV block"
    )
    add_switch(mem, "--no-prefix-caching", "MIXSERVE_NO_PREFIX_CACHING", "disable prefix caching")
    add_option(
        mem,
        "--adapter-slots",
        "MIXSERVE_ADAPTER_SLOTS",
        type=int,
        help="adapter slots on the device (default: what the slot memory budget holds, "
        "at most --max-num-seqs)",
    )
    add_option(
        mem,
        "--adapter-slot-memory",
        "MIXSERVE_ADAPTER_SLOT_MEMORY",
        type=parse_bytes,
        help="memory for adapter slots (default 2GiB)",
    )
    add_option(
        mem,
        "--adapter-slot-memory-fraction",
        "MIXSERVE_ADAPTER_SLOT_MEMORY_FRACTION",
        type=float,
        help="or a fraction of free GPU memory for adapter slots",
    )
    add_option(
        mem,
        "--host-cache-memory",
        "MIXSERVE_HOST_CACHE_MEMORY",
        type=parse_bytes,
        default=4 * 2**30,
        help="host-memory adapter cache (LRU)",
    )
    add_option(
        mem,
        "--max-lora-rank",
        "MIXSERVE_MAX_LORA_RANK",
        type=int,
        default=16,
        help="largest rank a hot-loaded adapter may have",
    )
    add_option(
        mem,
        "--max-experts",
        "MIXSERVE_MAX_EXPERTS",
        type=int,
        default=8,
        help="most experts per MLP site a hot-loaded adapter may have",
    )
    add_option(
        mem,
        "--max-attn-experts",
        "MIXSERVE_MAX_ATTN_EXPERTS",
        type=int,
        default=1,
        help="most experts per attention site (MoLA/DynMoLE)",
    )

    limits = parser.add_argument_group("limits")
    add_option(
        limits,
        "--max-num-seqs",
        "MIXSERVE_MAX_NUM_SEQS",
        type=int,
        default=64,
        help="sequences per step",
    )
    add_option(
        limits,
        "--max-num-batched-tokens",
        "MIXSERVE_MAX_NUM_BATCHED_TOKENS",
        type=int,
        default=2048,
        help="tokens per step",
    )
    add_option(
        limits, "--max-model-len", "MIXSERVE_MAX_MODEL_LEN", type=int, help="prompt + output"
    )
    add_option(
        limits,
        "--max-adapter-bypass",
        "MIXSERVE_MAX_ADAPTER_BYPASS",
        type=int,
        default=64,
        help="later requests of resident adapters that may pass one the adapter cap holds back",
    )
    add_option(
        limits,
        "--max-prompt-tokens",
        "MIXSERVE_MAX_PROMPT_TOKENS",
        type=int,
        help="longest prompt accepted",
    )
    add_option(
        limits,
        "--max-tokens-limit",
        "MIXSERVE_MAX_TOKENS_LIMIT",
        type=int,
        default=4096,
        help="largest max_tokens accepted",
    )
    add_option(
        limits,
        "--max-queue",
        "MIXSERVE_MAX_QUEUE",
        type=int,
        default=256,
        help="open requests before 429",
    )
    add_option(
        limits,
        "--max-body-size",
        "MIXSERVE_MAX_BODY_SIZE",
        type=parse_bytes,
        default=4 * 2**20,
        help="largest request body (413 above)",
    )
    add_option(
        limits,
        "--drain-timeout",
        "MIXSERVE_DRAIN_TIMEOUT",
        type=float,
        default=30.0,
        help="seconds running requests get to finish on SIGTERM",
    )
    add_switch(
        limits,
        "--expert-metrics",
        "MIXSERVE_EXPERT_METRICS",
        "export tokens routed per expert (bounded label cardinality)",
    )
    add_option(
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
