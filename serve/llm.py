"""mixserve.LLM: the offline Python API (as in vLLM), base model plus named adapters.

Runs the same engine as the server, stepping it on the caller's thread until every request of a
`generate` call is done.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from mixserve.adapters import AdapterError
from mixserve.config import (
    AdapterPoolConfig,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
)
from mixserve.engine.builder import build_engine
from mixserve.engine.core import EngineStats
from mixserve.gc_freeze import frozen_while_running
from mixserve.types import CompletionOutput, FinishReason, RequestOutput, SamplingParams, TokenDelta

logger = logging.getLogger(__name__)


def submission_order(adapters: Sequence[str | None]) -> list[int]:
    """The prompts' indices grouped by adapter: groups in the order their adapter first appears,
    prompts in input order within a group.

    The prompts of one generate call arrive together, so any order among them is first come,
    first served; grouped, the running batch holds a few adapters' rows instead of one adapter
    per row. A step's adapter cost grows with the adapters (and experts) it touches, not with
    its rows: on CPU each distinct adapter's weights are read from memory once or more per
    layer. Measured on 2 vCPUs (bench/RESULTS.md, session 28: 256 requests, 100 MixLoRA
    adapters drawn uniformly), decode steps took 1.48x the base model's grouped against 1.70x
    in input order. Adapters also finish together and free their slots for the next ones."""
    first_places: dict[str | None, int] = {}
    for name in adapters:
        first_places.setdefault(name, len(first_places))
    return sorted(range(len(adapters)), key=lambda i: first_places[adapters[i]])


def _per_prompt(value: Any, count: int, what: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{what}: {len(value)} values for {count} prompts")
        return list(value)
    return [value] * count


class LLM:
    """Load a base model (default: the embedded SmolLM2-135M-Instruct) and adapters by name."""

    def __init__(
        self,
        model: str | None = None,
        *,
        adapters: Mapping[str, str] | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        block_size: int = 16,
        kv_cache_memory_bytes: int = 512 * 2**20,
        num_kv_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        max_adapter_bypass: int = 64,
        max_lora_rank: int = 16,
        max_experts: int = 8,
        max_attn_experts: int = 1,
        num_adapter_slots: int | None = None,
        adapter_slot_memory_bytes: int | None = None,
        host_cache_bytes: int = 4 * 2**30,
        tune_malloc: bool = True,
    ) -> None:
        config = EngineConfig(
            model=ModelConfig(model=model, dtype=dtype, device=device),
            cache=CacheConfig(
                block_size, kv_cache_memory_bytes, num_kv_blocks, enable_prefix_caching
            ),
            scheduler=SchedulerConfig(
                max_num_seqs, max_num_batched_tokens, max_model_len, max_adapter_bypass
            ),
            adapters=AdapterPoolConfig(
                max_lora_rank=max_lora_rank,
                max_experts=max_experts,
                max_attn_experts=max_attn_experts,
                num_slots=num_adapter_slots,
                slot_memory_bytes=adapter_slot_memory_bytes,
                host_cache_bytes=host_cache_bytes,
            ),
            tune_malloc=tune_malloc,
        )
        built = build_engine(config, adapters)
        self.engine = built.core
        self.tokenizer = built.tokenizer
        self.arch = self.engine.runner.model.arch
        self.eos_token_ids = built.eos_token_ids
        self.max_model_len = built.max_model_len
        self._ids = itertools.count()
        for name in adapters or {}:
            self._load_now(name)

    def _load_now(self, name: str) -> None:
        """Load an adapter before any request (the offline API fails fast on a bad adapter)."""
        pager = self.engine.pager
        assert pager is not None
        pager.acquire(name)
        try:
            while not pager.is_ready(name):
                pager.wait()
                for result in pager.poll():
                    if result.name == name and result.error is not None:
                        raise result.error
        finally:
            pager.release(name)

    @property
    def adapter_names(self) -> list[str]:
        return sorted(self.engine.pager.sources()) if self.engine.pager is not None else []

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        adapter: str | None | Sequence[str | None] = None,
    ) -> list[RequestOutput]:
        """Complete each prompt (text, or token ids); adapter per prompt or one for all.

        Outputs come back in the prompts' order; the engine gets the requests grouped by
        adapter (`submission_order`)."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts and prompt_token_ids")
        texts: list[str | None]
        if prompts is not None:
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            token_lists = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        else:
            assert prompt_token_ids is not None
            ids = list(prompt_token_ids)
            if ids and isinstance(ids[0], int):
                token_lists = [list(ids)]
            else:
                token_lists = [list(p) for p in ids]  # type: ignore[arg-type]
            texts = [None] * len(token_lists)
        count = len(token_lists)
        params = _per_prompt(sampling_params or SamplingParams(), count, "sampling_params")
        adapters = _per_prompt(adapter, count, "adapter")
        names = self.adapter_names
        for name in adapters:
            if name is not None and name not in names:
                raise ValueError(f"unknown adapter {name!r} (loaded: {', '.join(names) or 'none'})")
        request_ids = [f"offline-{next(self._ids)}" for _ in range(count)]
        added: list[str] = []
        try:
            for i in submission_order(adapters):
                self.engine.add_request(request_ids[i], token_lists[i], params[i], adapters[i])
                added.append(request_ids[i])
        except (ValueError, AdapterError):
            for rid in added:
                self.engine.abort(rid)
            raise
        return self._collect(request_ids, texts, token_lists, params, adapters)

    def _collect(
        self,
        request_ids: list[str],
        texts: list[str | None],
        token_lists: list[list[int]],
        params: list[SamplingParams],
        adapters: list[str | None],
    ) -> list[RequestOutput]:
        deltas: dict[tuple[str, int], list[TokenDelta]] = {}
        with frozen_while_running():
            while self.engine.has_work:
                for delta in self.engine.step():
                    deltas.setdefault((delta.request_id, delta.index), []).append(delta)
                if not self.engine.last_step_ran:
                    self.engine.wait_for_progress(0.05)
        outputs = []
        for rid, text, tokens, p, name in zip(
            request_ids, texts, token_lists, params, adapters, strict=True
        ):
            completions = []
            for index in range(p.n):
                parts = deltas.get((rid, index), [])
                token_ids = tuple(t for d in parts for t in d.token_ids)
                reason = parts[-1].finish_reason if parts else None
                if reason is FinishReason.ERROR:
                    raise RuntimeError(f"request failed: {parts[-1].error}")
                completions.append(
                    CompletionOutput(
                        index=index,
                        text=self.tokenizer.decode(list(token_ids), skip_special_tokens=True),
                        token_ids=token_ids,
                        finish_reason=reason,
                        logprobs=tuple(lp for d in parts for lp in d.logprobs),
                    )
                )
            outputs.append(RequestOutput(rid, text, tuple(tokens), name, tuple(completions)))
        return outputs

    def chat(
        self,
        messages: Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        adapter: str | None | Sequence[str | None] = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, via the tokenizer's template."""
        single = bool(messages) and isinstance(messages[0], Mapping)
        conversations = [messages] if single else list(messages)
        token_lists = [
            list(
                self.tokenizer.apply_chat_template(
                    list(c), add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
            for c in conversations
        ]
        return self.generate(
            prompt_token_ids=token_lists, sampling_params=sampling_params, adapter=adapter
        )
