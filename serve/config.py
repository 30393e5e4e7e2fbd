"""Engine configuration: frozen dataclasses validated on creation (no torch: the scheduler,
which must stay pure Python, reads these too)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Accepted spellings -> canonical dtype name (mixserve.model.dtypes maps names to torch dtypes).
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def canonical_dtype(value: str) -> str:
    try:
        return DTYPE_NAMES[value.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown dtype {value!r} (float32, bfloat16, float16)") from None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model: str | None = None  # local Hugging Face folder; None = the embedded SmolLM2
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if not _DEVICE.match(self.device):
            raise ValueError(f"unknown device {self.device!r} (cpu, cuda, cuda:N)")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory_bytes: int = 512 * 2**20
    num_kv_blocks: int | None = None  # overrides the memory budget when set
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.kv_cache_memory_bytes < 1:
            raise ValueError("kv_cache_memory_bytes must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # running sequences per step
    max_num_batched_tokens: int = 2048  # tokens per step (prefill chunks + decodes)
    max_model_len: int | None = None  # prompt + output tokens; None = the model's limit
    # A waiting request held back only by the per-step adapter cap may be passed by at most
    # this many later requests whose adapter is already in the step (0 = strict FCFS). Batching
    # more sequences per resident adapter is most of many-adapter throughput; the bound keeps
    # the held-back request from starving.
    max_adapter_bypass: int = 64

    def __post_init__(self) -> None:
        if self.max_adapter_bypass < 0:
            raise ValueError("max_adapter_bypass must be >= 0")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")


# select() refuses timeouts from ~1e10 s; a week is more than any load should wait.
MAX_LOAD_TIMEOUT_S = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class AdapterPoolConfig:
    """Adapter memory. The slot shape is at least large enough for the adapters given at start-up;
    adapters hot-loaded later must fit within it (or are refused with AdapterCapacityError)."""

    max_lora_rank: int = 16
    max_experts: int = 8  # experts per MLP / FFN site (MixLoRA, LoRAMoE, MoLA, DynMoLE)
    max_attn_experts: int = 1  # experts per attention site (MoLA, DynMoLE); 1 = LoRA only
    num_slots: int | None = None  # adapter slots on the device; None = from the memory budget
    # Cap when sizing from the budget (the slot count also caps adapters per step). None: the
    # scheduler's max_num_seqs, the most adapters a step can hold; slots past it would only cache
    # adapters, which the host tier does.
    max_num_slots: int | None = None
    slot_memory_bytes: int | None = None  # slot budget in bytes (default: 2 GiB)
    slot_memory_fraction: float | None = None  # or a fraction of free device memory (CUDA)
    host_cache_bytes: int = 4 * 2**30  # host tier (LRU) in front of the disk
    max_load_workers: int = 2  # on CPU also at most half the CPUs
    # Read adapter files in worker processes (adapters/load_worker.py): a .bin's
    # weights-only unpickling holds the GIL, which the engine thread needs for every op.
    load_in_processes: bool = True
    # A worker still reading after this long is killed and the load fails: a crafted pickle
    # can hang any unpickler (a dict key whose hash takes 2**64 steps), a dead disk any read.
    load_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.max_lora_rank < 1:
            raise ValueError("max_lora_rank must be >= 1")
        if self.max_experts < 1 or self.max_attn_experts < 1:
            raise ValueError("max_experts and max_attn_experts must be >= 1")
        if self.num_slots is not None and self.num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        if self.max_num_slots is not None and self.max_num_slots < 1:
            raise ValueError("max_num_slots must be >= 1")
        if self.slot_memory_bytes is not None and self.slot_memory_bytes < 1:
            raise ValueError("slot_memory_bytes must be >= 1")
        if self.slot_memory_fraction is not None and not 0 < self.slot_memory_fraction <= 1:
            raise ValueError("slot_memory_fraction must be in (0, 1]")
        if self.host_cache_bytes < 1 or self.max_load_workers < 1:
            raise ValueError("host_cache_bytes and max_load_workers must be >= 1")
        if not 0 < self.load_timeout_s <= MAX_LOAD_TIMEOUT_S:  # also refuses NaN
            raise ValueError(f"load_timeout_s must be > 0 and <= {MAX_LOAD_TIMEOUT_S:g} seconds")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    adapters: AdapterPoolConfig = AdapterPoolConfig()
    # On a CPU device: keep freed step memory in glibc's heap (process-wide; see cpu_memory).
    tune_malloc: bool = True


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # default: the model folder's name
    api_key: str | None = None  # required on every /v1 route when set
    adapter_dirs: tuple[str, ...] = ()  # roots that adapter names resolve under
    enable_adapter_loading: bool = False  # POST /v1/load_lora_adapter and /unload_lora_adapter
    demo_adapters: bool = False  # generate and serve the synthetic demo-* adapters
    max_body_bytes: int = 4 * 2**20
    max_prompt_tokens: int | None = None  # None: the model's context length
    max_tokens_limit: int = 4096  # upper bound on max_tokens per request
    max_queue: int = 256  # open requests before new ones get 429
    drain_timeout_s: float = 30.0  # SIGTERM: time running requests get to finish
    expert_metrics: bool = False  # opt-in per-expert routing series
    max_expert_metric_adapters: int = 20

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError("port must be in [1, 65535]")
        for name in ("max_body_bytes", "max_tokens_limit", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError("max_prompt_tokens must be >= 1")
        if self.drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must be >= 0")
