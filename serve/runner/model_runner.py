"""ModelRunner: a step's plan -> flat input tensors + ForwardContext -> logits -> sampled tokens."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from mixserve.adapters.batch import build_lora_batch
from mixserve.adapters.pool import AdapterPool
from mixserve.model.context import ForwardContext
from mixserve.model.decoder import DecoderModel
from mixserve.runner.kv_cache import allocate_kv_cache
from mixserve.runner.sampler import sample
from mixserve.types import RunnerOutput, SchedulerOutput


class ModelRunner:
    def __init__(
        self,
        model: DecoderModel,
        num_kv_blocks: int,
        block_size: int,
        adapter_pool: AdapterPool | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.device = model.device
        self.kv_caches = allocate_kv_cache(
            model.arch, num_kv_blocks, block_size, model.dtype, model.device
        )
        self.adapter_pool = adapter_pool
        self.eos_token_ids = eos_token_ids
        self.count_experts = False  # opt-in routing statistics (metrics)

    def prepare(
        self,
        plan: SchedulerOutput,
        adapter_slots: Mapping[str, int],
        between_layers: Callable[[], object] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
        """Flatten the plan: sequences in plan order, each sequence's new tokens in order."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        token_slots: list[int] = []
        logits_indices: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        max_blocks = max(len(s.block_ids) for s in plan.sequences)
        block_tables = torch.zeros((len(plan.sequences), max_blocks), dtype=torch.int32)
        for b, seq in enumerate(plan.sequences):
            start, count = seq.num_computed_tokens, len(seq.token_ids)
            if len(seq.block_ids) * bs < start + count:
                raise ValueError(
                    f"sequence {seq.seq_id}: {len(seq.block_ids)} blocks hold fewer than "
                    f"{start + count} tokens"
                )
            adapter_slot = -1 if seq.adapter is None else adapter_slots[seq.adapter]
            input_ids += seq.token_ids
            for pos in range(start, start + count):
                positions.append(pos)
                slot_mapping.append(seq.block_ids[pos // bs] * bs + pos % bs)
            token_slots += [adapter_slot] * count
            if seq.sample:
                logits_indices.append(len(input_ids) - 1)
            query_lens.append(count)
            seq_lens.append(start + count)
            block_tables[b, : len(seq.block_ids)] = torch.tensor(seq.block_ids, dtype=torch.int32)

        device = self.device

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        lora = None
        if self.adapter_pool is not None and any(s >= 0 for s in token_slots):
            lora = build_lora_batch(
                self.adapter_pool, tensor(token_slots), count_experts=self.count_experts
            )
        ctx = ForwardContext(
            slot_mapping=tensor(slot_mapping),
            block_tables=block_tables.to(device),
            query_lens=query_lens,
            seq_lens=seq_lens,
            kv_caches=self.kv_caches,
            logits_indices=tensor(logits_indices),
            lora=lora,
            between_layers=between_layers,
        )
        return tensor(input_ids), tensor(positions), ctx

    @torch.inference_mode()
    def _forward(
        self,
        plan: SchedulerOutput,
        adapter_slots: Mapping[str, int],
        between_layers: Callable[[], object] | None = None,
    ) -> tuple[torch.Tensor, ForwardContext]:
        input_ids, positions, ctx = self.prepare(plan, adapter_slots, between_layers)
        return self.model.forward(input_ids, positions, ctx), ctx

    def compute_logits(
        self, plan: SchedulerOutput, adapter_slots: Mapping[str, int]
    ) -> torch.Tensor:
        """Float32 logits [N, V], one row per sequence with sample=True, in plan order."""
        return self._forward(plan, adapter_slots)[0]

    @torch.inference_mode()
    def copy_blocks(self, copies: tuple[tuple[int, int], ...]) -> None:
        """KV block copy-on-write (n > 1 completions forking off one prompt)."""
        if not copies:
            return
        src = torch.tensor([c[0] for c in copies], dtype=torch.int64, device=self.device)
        dst = torch.tensor([c[1] for c in copies], dtype=torch.int64, device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
            v_cache.index_copy_(0, dst, v_cache.index_select(0, src))

    def execute(
        self,
        plan: SchedulerOutput,
        adapter_slots: Mapping[str, int],
        between_layers: Callable[[], object] | None = None,
    ) -> RunnerOutput:
        """Run the plan's forward and sample; between_layers is called after each layer."""
        self.copy_blocks(plan.block_copies)
        if not plan.sequences:
            return RunnerOutput()
        logits, ctx = self._forward(plan, adapter_slots, between_layers)
        counts: dict[int, tuple[int, ...]] = {}
        if ctx.lora is not None and ctx.lora.expert_counts is not None:
            for slot, row in enumerate(ctx.lora.expert_counts.tolist()):
                if any(row):
                    counts[slot] = tuple(row)
        sampled_seqs = [s for s in plan.sequences if s.sample]
        sampled = {}
        if sampled_seqs:
            tokens = sample(logits, sampled_seqs, self.eos_token_ids)
            sampled = {s.seq_id: t for s, t in zip(sampled_seqs, tokens, strict=True)}
        return RunnerOutput(sampled=sampled, expert_counts=counts)
