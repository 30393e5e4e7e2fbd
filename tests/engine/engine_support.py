"""Build small engines over a tiny model with many adapters, and run requests through them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from support.adapter_files import ATTN, MLP, BaseDims, write_adapter
from support.harness import SeqSpec, run_sequences
from support.tiny_models import save_tiny_model, save_tiny_tokenizer, tiny_config

from mixserve.config import (
    AdapterPoolConfig,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from mixserve.engine import EngineCore
from mixserve.engine.builder import BuiltEngine, build_engine
from mixserve.types import FinishReason, SamplingParams, TokenDelta

FAMILY = "qwen3"
# strategy, rank, experts, targets: cycled over the adapters (ranks and expert counts vary)
KINDS = [
    (None, 4, 1, ("q_proj", "v_proj")),
    ("mixlora", 8, 4, ATTN + MLP),
    ("mixlora-dynamic", 16, 6, MLP),
    ("loramoe", 8, 3, ("o_proj",) + MLP),
    ("mola", 4, 4, ATTN + ("up_proj",)),
    ("dynmole", 12, 5, ("k_proj", "gate_proj", "down_proj")),
    ("mixlora-switch", 8, 2, MLP),
]


def make_model(root: str) -> str:
    path = save_tiny_model(f"{root}/model", FAMILY, seed=3)
    save_tiny_tokenizer(path)
    return path


def make_adapters(root: str, count: int) -> dict[str, str]:
    dims = BaseDims.of(tiny_config(FAMILY))
    adapters = {}
    for i in range(count):
        strategy, r, experts, targets = KINDS[i % len(KINDS)]
        adapters[f"ad{i}"] = write_adapter(
            f"{root}/ad{i}",
            dims,
            strategy,
            r=r,
            num_experts=experts,
            targets=targets,
            seed=100 + i,
            fmt="safetensors" if i % 2 else "bin",
        )
    return adapters


def engine(
    model_dir: str,
    adapters: dict[str, str],
    *,
    slots: int = 6,
    num_blocks: int = 512,
    block_size: int = 4,
    max_seqs: int = 64,
    budget: int = 96,
    caching: bool = True,
    host_bytes: int = 2**30,
) -> BuiltEngine:
    config = EngineConfig(
        model=ModelConfig(model=model_dir),
        cache=CacheConfig(
            block_size=block_size, num_kv_blocks=num_blocks, enable_prefix_caching=caching
        ),
        scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget),
        adapters=AdapterPoolConfig(
            max_lora_rank=16,
            max_experts=8,
            max_attn_experts=8,
            num_slots=slots,
            host_cache_bytes=host_bytes,
        ),
    )
    return build_engine(config, adapters)


def run_all(
    core: EngineCore,
    requests: Iterable[tuple[str, list[int], SamplingParams, str | None]],
    max_steps: int = 10_000,
) -> dict[tuple[str, int], list[TokenDelta]]:
    for rid, prompt, params, adapter in requests:
        core.add_request(rid, prompt, params, adapter)
    out: dict[tuple[str, int], list[TokenDelta]] = {}
    for _ in range(max_steps):
        if not core.has_work:
            break
        if core.pager is not None and not core.scheduler.running:
            core.pager.wait(0.05)  # only waiting for adapter loads: don't spin
        for delta in core.step():
            out.setdefault((delta.request_id, delta.index), []).append(delta)
    assert not core.has_work, "requests left unfinished"
    return out


def tokens_of(deltas: list[TokenDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def finish_of(deltas: list[TokenDelta]) -> FinishReason | None:
    return deltas[-1].finish_reason if deltas else None


def top2_margin(core: EngineCore, tokens: list[int], adapter: str | None) -> float:
    """Relative gap between the two best next-token logits after `tokens` (for telling a
    legitimate floating-point tie apart from a real divergence)."""
    slots = {}
    if adapter is not None:
        core.pager.acquire(adapter)
        while not core.pager.is_ready(adapter):
            core.pager.wait()
            core.pager.poll()
        slots = core.pager.prepare([adapter])
    logits = run_sequences(core.runner, [SeqSpec(tokens, adapter)], slots)[0][-1]
    if adapter is not None:
        core.pager.unpin_all()
        core.pager.release(adapter)
    top = torch.topk(logits, 2).values
    return float((top[0] - top[1]) / top[0].abs().clamp_min(1e-6))


def assert_same_greedy(
    core: EngineCore, prompt: list[int], adapter: str | None, got: list[int], want: list[int]
) -> None:
    """Equal, or diverging only where the reference's next token was a numerical tie."""
    if got == want:
        return
    j = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
    margin = top2_margin(core, prompt + want[:j], adapter)
    assert margin < 1e-4, f"outputs diverge at token {j} with a clear margin ({margin:.2e})"
