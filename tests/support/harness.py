"""Drive the paged runner directly: chunked prefills and decodes of several sequences per step."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mixserve.adapters import AdapterPool
from mixserve.model import DecoderModel
from mixserve.runner import ModelRunner
from mixserve.types import SamplingParams, ScheduledSequence, SchedulerOutput

GREEDY = SamplingParams(temperature=0.0, max_tokens=1)


@dataclass
class SeqSpec:
    token_ids: list[int]
    adapter: str | None = None


def make_runner(
    model: DecoderModel,
    pool: AdapterPool | None = None,
    *,
    num_blocks: int = 64,
    block_size: int = 4,
) -> ModelRunner:
    return ModelRunner(model, num_blocks, block_size, pool)


def step_logits(runner: ModelRunner, plan: SchedulerOutput, slots: dict[str, int]) -> torch.Tensor:
    """Logits of every new token of the step, [T, V] float32, in plan order."""
    input_ids, positions, ctx = runner.prepare(plan, slots)
    ctx = dataclasses.replace(ctx, logits_indices=torch.arange(input_ids.shape[0]))
    with torch.inference_mode():
        return runner.model.forward(input_ids, positions, ctx)


def run_sequences(
    runner: ModelRunner,
    seqs: Sequence[SeqSpec],
    slots: dict[str, int] | None = None,
    *,
    chunk_sizes: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """All-position logits [len, V] per sequence. Each step feeds every unfinished sequence its
    next chunk (chunk_sizes cycles; None = whole sequence in one step), so steps mix prefill
    chunks, single-token decode-like steps and sequences of different adapters."""
    slots = slots or {}
    bs = runner.block_size
    next_block = 0
    tables = []
    for seq in seqs:
        n = -(-len(seq.token_ids) // bs)
        tables.append(tuple(range(next_block, next_block + n)))
        next_block += n
    assert next_block <= runner.num_kv_blocks, "harness: not enough KV blocks"
    done = [0] * len(seqs)
    out: list[list[torch.Tensor]] = [[] for _ in seqs]
    step = 0
    while any(d < len(s.token_ids) for d, s in zip(done, seqs, strict=True)):
        scheduled, owners = [], []
        for i, seq in enumerate(seqs):
            remaining = len(seq.token_ids) - done[i]
            if remaining == 0:
                continue
            size = remaining if chunk_sizes is None else chunk_sizes[(step + i) % len(chunk_sizes)]
            take = min(size, remaining)
            scheduled.append(
                ScheduledSequence(
                    seq_id=i,
                    token_ids=tuple(seq.token_ids[done[i] : done[i] + take]),
                    num_computed_tokens=done[i],
                    block_ids=tables[i],
                    adapter=seq.adapter,
                    sample=True,
                    sampling=GREEDY,
                )
            )
            owners.append((i, take))
        logits = step_logits(runner, SchedulerOutput(tuple(scheduled)), slots)
        row = 0
        for i, take in owners:
            out[i].append(logits[row : row + take])
            row += take
            done[i] += take
        step += 1
    return [torch.cat(chunks) for chunks in out]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
