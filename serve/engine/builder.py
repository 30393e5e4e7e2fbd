"""Start-up: load the model, size the KV cache and adapter slots, wire the engine's parts."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mixserve.adapters import AdapterPool, PoolShape, load_adapter
from mixserve.adapters.config_parser import parse_adapter_config
from mixserve.adapters.exchange_dirs import DEFAULT_MAX_SPARE_BYTES
from mixserve.adapters.exchange_files import fresh_copies, raise_open_files_limit
from mixserve.adapters.files import find_adapter_files, read_config
from mixserve.adapters.loads import Loader
from mixserve.adapters.pager import AdapterPager
from mixserve.adapters.pool import RANK_ALIGNMENT
from mixserve.adapters.process_loader import ProcessLoader
from mixserve.adapters.sizing import num_slots_for_budget, slot_budget_bytes
from mixserve.config import AdapterPoolConfig, EngineConfig
from mixserve.cpu_memory import keep_freed_memory
from mixserve.engine.core import EngineCore
from mixserve.kernels import prepare_cpu_kernels
from mixserve.model import ArchConfig, load_model
from mixserve.model.default_model import resolve_model_dir
from mixserve.model.dtypes import torch_dtype
from mixserve.runner import ModelRunner
from mixserve.runner.kv_cache import num_blocks_for_budget
from mixserve.scheduler import BlockManager, Scheduler
from mixserve.torch_threads import ComputeThreadBudget, available_cpus

logger = logging.getLogger(__name__)

# The slot budget where neither bytes nor a fraction is given, allocated (zeroed) at start-up. It
# holds 64 slots (the default max_num_seqs: an adapter per sequence of a full step) of 28 MB
# adapters (rank 8, 4 experts, all 7 targets on SmolLM2-135M); smaller adapters get those 64 in
# less memory.
_DEFAULT_SLOT_BUDGET = 2 * 2**30


@dataclass(frozen=True, slots=True)
class BuiltEngine:
    core: EngineCore
    model_dir: str
    tokenizer: object  # a transformers tokenizer
    eos_token_ids: frozenset[int]
    max_model_len: int


def pool_shape(
    config: AdapterPoolConfig, adapters: Mapping[str, str], arch: ArchConfig
) -> PoolShape:
    """The configured shape, grown to hold every adapter given at start-up (configs only are read:
    weights load lazily, and a bad folder fails its requests, not the server)."""
    specs = []
    for name, path in adapters.items():
        files = find_adapter_files(name, path)
        specs.append(
            parse_adapter_config(name, files.config_path, read_config(name, files.config_path))
        )
    covering = PoolShape.covering(specs, arch.num_layers)
    rank = max(covering.max_rank, config.max_lora_rank)
    return PoolShape(
        max_rank=-(-rank // RANK_ALIGNMENT) * RANK_ALIGNMENT,
        attn_experts=max(covering.attn_experts, config.max_attn_experts),
        mlp_experts=max(covering.mlp_experts, config.max_experts),
        attn_routers=True,
        mlp_routers=True,
        ffn_router=True,
    )


def _num_slots(
    config: AdapterPoolConfig,
    shape: PoolShape,
    arch: ArchConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_num_seqs: int,
) -> int:
    if config.num_slots is not None:
        return config.num_slots
    if config.slot_memory_fraction is not None:
        budget = slot_budget_bytes(device, fraction_of_free=config.slot_memory_fraction)
    else:
        budget = slot_budget_bytes(
            device, budget_bytes=config.slot_memory_bytes or _DEFAULT_SLOT_BUDGET
        )
    max_slots = config.max_num_slots or max_num_seqs
    return num_slots_for_budget(shape, arch, dtype, budget, max_slots=max_slots)


def _num_load_workers(config: AdapterPoolConfig, device: torch.device) -> int:
    """On CPU, loads take at most half the CPUs: each worker keeps one busy, and the steps
    running beside them give up as many threads (ComputeThreadBudget)."""
    if device.type != "cpu":
        return config.max_load_workers
    return max(1, min(config.max_load_workers, available_cpus() // 2))


def build_engine(config: EngineConfig, adapters: Mapping[str, str] | None = None) -> BuiltEngine:

    adapters = dict(adapters or {})
    model_dir = resolve_model_dir(config.model.model)
    dtype, device = torch_dtype(config.model.dtype), torch.device(config.model.device)
    tune_malloc = device.type == "cpu" and config.tune_malloc
    if tune_malloc:
        keep_freed_memory()
    if device.type == "cpu":
        prepare_cpu_kernels()  # a first build compiles here, not inside the first step
    num_load_workers = _num_load_workers(config.adapters, device)
    loader: Loader = load_adapter
    if config.adapters.load_in_processes:
        process_loader = ProcessLoader(
            num_load_workers,
            config.adapters.load_timeout_s,
            keep_freed_memory=tune_malloc,
            # Spare exchange files are host memory on top of the host tier's: at most its budget.
            max_spare_bytes=min(config.adapters.host_cache_bytes, DEFAULT_MAX_SPARE_BYTES),
        )
        raise_open_files_limit()  # each host-tier adapter's file stays mapped
        process_loader.start()  # the worker imports torch while the model loads
        loader = process_loader
    try:
        return _assemble_engine(
            config, adapters, model_dir, dtype, device, loader, num_load_workers
        )
    except BaseException:  # a failed build leaves no worker process behind
        if isinstance(loader, ProcessLoader):
            loader.close()
        raise


def _assemble_engine(
    config: EngineConfig,
    adapters: dict[str, str],
    model_dir: str,
    dtype: torch.dtype,
    device: torch.device,
    loader: Loader,
    num_load_workers: int,
) -> BuiltEngine:
    from transformers import AutoTokenizer

    model = load_model(model_dir, dtype, device)
    arch = model.arch
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = set(arch.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    eos_ids = frozenset(eos)

    shape = pool_shape(config.adapters, adapters, arch)
    num_slots = _num_slots(
        config.adapters, shape, arch, dtype, device, config.scheduler.max_num_seqs
    )
    pool = AdapterPool(arch, shape, num_slots, dtype, device)
    # Read-backs out of slots into pages that exist: the process loader's spare files.
    host_copies = (
        loader.exchange_files.host_copies if isinstance(loader, ProcessLoader) else fresh_copies
    )
    pager = AdapterPager(
        pool,
        host_budget_bytes=config.adapters.host_cache_bytes,
        max_workers=num_load_workers,
        loader=loader,
        host_copies=host_copies,
    )
    for name, path in adapters.items():
        pager.add_source(name, path)

    cache = config.cache
    num_blocks = cache.num_kv_blocks or num_blocks_for_budget(
        arch, cache.block_size, dtype, cache.kv_cache_memory_bytes
    )
    max_model_len = (
        config.scheduler.max_model_len
        or arch.max_position_embeddings
        or (num_blocks * cache.block_size)
    )
    runner = ModelRunner(model, num_blocks, cache.block_size, pool, eos_ids)
    blocks = BlockManager(
        num_blocks, cache.block_size, enable_prefix_caching=cache.enable_prefix_caching
    )
    scheduler = Scheduler(
        config.scheduler,
        blocks,
        max_adapters_per_step=num_slots,
        eos_token_ids=eos_ids,
        max_model_len=max_model_len,
    )
    if isinstance(loader, ProcessLoader):
        # The engine is ready when its first adapter load would not wait for the worker's imports.
        loader.wait_until_ready()
    logger.info(
        "engine: %s (%s), %d KV blocks x %d tokens, %d adapter slots (rank %d, experts %d/%d)",
        model_dir,
        dtype,
        num_blocks,
        cache.block_size,
        num_slots,
        shape.max_rank,
        shape.attn_experts,
        shape.mlp_experts,
    )
    return BuiltEngine(
        EngineCore(
            runner,
            scheduler,
            pager,
            ComputeThreadBudget() if device.type == "cpu" else None,
            hold_ahead_loads=device.type == "cpu",
        ),
        model_dir,
        tokenizer,
        eos_ids,
        max_model_len,
    )
