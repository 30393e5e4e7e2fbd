"""mixserve.LLM: the offline Python API (as in vLLM), base model plus named adapters."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from mixserve.adapters import AdapterPool, AdapterWeights, PoolShape, load_adapter
from mixserve.config import AdapterPoolConfig, CacheConfig, ModelConfig, SchedulerConfig
from mixserve.model import load_model
from mixserve.model.default_model import resolve_model_dir
from mixserve.offline_loop import LoopSequence, run_to_completion
from mixserve.runner import ModelRunner
from mixserve.runner.kv_cache import num_blocks_for_budget
from mixserve.types import CompletionOutput, RequestOutput, SamplingParams, SchedulerOutput

logger = logging.getLogger(__name__)


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
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        max_lora_rank: int | None = None,
        max_experts: int | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        self.model_config = ModelConfig(model=model, dtype=dtype, device=device)
        self.cache_config = CacheConfig(block_size, kv_cache_memory_bytes, num_kv_blocks)
        self.scheduler_config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len)
        pool_config = AdapterPoolConfig(max_lora_rank, max_experts)
        model_dir = resolve_model_dir(model)
        torch_dtype = self.model_config.torch_dtype
        self.model = load_model(model_dir, torch_dtype, device)
        self.arch = self.model.arch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        loaded = [load_adapter(name, path, self.arch) for name, path in (adapters or {}).items()]
        self.adapter_slots: dict[str, int] = {}
        pool = self._build_pool(loaded, pool_config) if loaded else None
        num_blocks = num_kv_blocks or num_blocks_for_budget(
            self.arch, block_size, torch_dtype, kv_cache_memory_bytes
        )
        self.runner = ModelRunner(self.model, num_blocks, block_size, pool)
        eos = set(self.arch.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_token_ids = frozenset(eos)
        self.max_model_len = (
            max_model_len or self.arch.max_position_embeddings or num_blocks * block_size
        )
        self._next_request = 0

    def _build_pool(self, loaded: list[AdapterWeights], config: AdapterPoolConfig) -> AdapterPool:
        shape = PoolShape.covering((w.spec for w in loaded), self.arch.num_layers)
        if config.max_lora_rank is not None or config.max_experts is not None:
            rank = max(shape.max_rank, config.max_lora_rank or 0)
            experts = config.max_experts or 1
            shape = PoolShape(
                max_rank=-(-rank // 8) * 8,
                attn_experts=max(shape.attn_experts, experts if shape.attn_routers else 1),
                mlp_experts=max(shape.mlp_experts, experts),
                attn_routers=shape.attn_routers,
                mlp_routers=shape.mlp_routers,
                ffn_router=shape.ffn_router,
            )
        pool = AdapterPool(self.arch, shape, len(loaded), self.model.dtype, self.model.device)
        for slot, weights in enumerate(loaded):
            pool.load(slot, weights)
            self.adapter_slots[weights.name] = slot
            logger.info(
                "adapter '%s' (%s) in slot %d", weights.name, weights.spec.family.value, slot
            )
        return pool

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapter_slots)

    def _execute(self, plan: SchedulerOutput) -> dict[int, int]:
        return self.runner.execute(plan, self.adapter_slots).sampled_token_ids

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        adapter: str | None | Sequence[str | None] = None,
    ) -> list[RequestOutput]:
        """Complete each prompt (text, or token ids); adapter per prompt or one for all."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts and prompt_token_ids")
        texts: list[str | None]
        if prompts is not None:
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            token_lists = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]  # type: ignore[arg-type]
        else:
            assert prompt_token_ids is not None
            ids = list(prompt_token_ids)
            token_lists = [list(ids)] if ids and isinstance(ids[0], int) else [list(p) for p in ids]  # type: ignore[arg-type]
            texts = [None] * len(token_lists)
        count = len(token_lists)
        params = _per_prompt(sampling_params or SamplingParams(), count, "sampling_params")
        adapters = _per_prompt(adapter, count, "adapter")
        sequences = []
        for i, (tokens, p, name) in enumerate(zip(token_lists, params, adapters, strict=True)):
            self._check_request(tokens, p, name)
            sequences.append(
                LoopSequence(seq_id=i, prompt_ids=list(tokens), adapter=name, sampling=p)
            )
        run_to_completion(
            sequences,
            self._execute,
            num_blocks=self.runner.num_kv_blocks,
            block_size=self.runner.block_size,
            max_num_seqs=self.scheduler_config.max_num_seqs,
            max_num_batched_tokens=self.scheduler_config.max_num_batched_tokens,
            eos_token_ids=self.eos_token_ids,
        )
        outputs = []
        for text, seq in zip(texts, sequences, strict=True):
            completion = CompletionOutput(
                index=0,
                text=self.tokenizer.decode(seq.output_ids, skip_special_tokens=True),
                token_ids=tuple(seq.output_ids),
                finish_reason=seq.finish_reason,
            )
            outputs.append(
                RequestOutput(
                    request_id=str(self._next_request),
                    prompt=text,
                    prompt_token_ids=tuple(seq.prompt_ids),
                    adapter=seq.adapter,
                    outputs=(completion,),
                )
            )
            self._next_request += 1
        return outputs

    def chat(
        self,
        messages: Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        adapter: str | None | Sequence[str | None] = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, via the tokenizer's template."""
        conversations = (
            [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        )
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

    def _check_request(
        self, tokens: Sequence[int], params: SamplingParams, adapter: str | None
    ) -> None:
        if not tokens:
            raise ValueError("empty prompt")
        if any(not 0 <= t < self.arch.vocab_size for t in tokens):
            raise ValueError(f"prompt token ids must be in [0, {self.arch.vocab_size})")
        if len(tokens) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(tokens)} tokens) + max_tokens ({params.max_tokens}) exceed "
                f"max_model_len ({self.max_model_len})"
            )
        if adapter is not None and adapter not in self.adapter_slots:
            known = ", ".join(self.adapter_slots) or "none"
            raise ValueError(f"unknown adapter {adapter!r} (loaded: {known})")
