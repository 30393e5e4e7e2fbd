"""A simple step loop that runs a fixed set of requests to completion on the paged runner.

Admission is FCFS; each sequence reserves the KV blocks for its whole prompt plus max_tokens when
admitted, so it can never run out mid-way (no preemption needed). Every step takes all decode
tokens first, then prefill chunks under the token budget, in one forward pass.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from mixserve.types import FinishReason, SamplingParams, ScheduledSequence, SchedulerOutput


@dataclass(slots=True)
class LoopSequence:
    seq_id: int
    prompt_ids: list[int]
    adapter: str | None
    sampling: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    finish_reason: FinishReason | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def run_to_completion(
    sequences: Sequence[LoopSequence],
    execute: Callable[[SchedulerOutput], dict[int, int]],
    *,
    num_blocks: int,
    block_size: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    eos_token_ids: frozenset[int],
) -> None:
    """Generate until every sequence finishes; results are written into the sequences."""
    waiting = deque(sequences)
    running: list[LoopSequence] = []
    free_blocks = list(range(num_blocks - 1, -1, -1))
    for seq in sequences:
        needed = blocks_needed(len(seq.prompt_ids) + seq.sampling.max_tokens, block_size)
        if needed > num_blocks:
            raise ValueError(
                f"request {seq.seq_id}: prompt ({len(seq.prompt_ids)}) + max_tokens "
                f"({seq.sampling.max_tokens}) exceed the KV cache "
                f"({num_blocks * block_size} tokens)"
            )
    while waiting or running:
        while waiting and len(running) < max_num_seqs:
            seq = waiting[0]
            needed = blocks_needed(len(seq.prompt_ids) + seq.sampling.max_tokens, block_size)
            if needed > len(free_blocks):
                break
            seq.block_ids = [free_blocks.pop() for _ in range(needed)]
            running.append(waiting.popleft())
        budget = max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        decodes = [s for s in running if s.num_computed == s.num_tokens - 1]
        prefills = [s for s in running if s.num_computed < s.num_tokens - 1]
        for seq in decodes + prefills:
            take = min(seq.num_tokens - seq.num_computed, budget)
            if take <= 0:
                continue
            budget -= take
            start = seq.num_computed
            scheduled.append(
                ScheduledSequence(
                    seq_id=seq.seq_id,
                    token_ids=tuple(seq.token(p) for p in range(start, start + take)),
                    num_computed_tokens=start,
                    block_ids=tuple(seq.block_ids),
                    adapter=seq.adapter,
                    sample=start + take == seq.num_tokens,
                    sampling=seq.sampling,
                    num_output_tokens=len(seq.output_ids),
                )
            )
        sampled = execute(SchedulerOutput(tuple(scheduled)))
        by_id = {s.seq_id: s for s in running}
        for item in scheduled:
            seq = by_id[item.seq_id]
            seq.num_computed += len(item.token_ids)
            token = sampled.get(seq.seq_id)
            if token is None:
                continue
            seq.output_ids.append(token)
            params = seq.sampling
            if token in params.stop_token_ids or (not params.ignore_eos and token in eos_token_ids):
                seq.finish_reason = FinishReason.STOP
            elif len(seq.output_ids) >= params.max_tokens:
                seq.finish_reason = FinishReason.LENGTH
        for seq in [s for s in running if s.finish_reason is not None]:
            free_blocks.extend(reversed(seq.block_ids))
            seq.block_ids = []
            running.remove(seq)
