"""A deterministic stand-in for the model runner: the next token depends only on a sequence's
tokens (and completion index), so recomputing after preemption must give the same output."""

from __future__ import annotations

from mixserve.types import RunnerOutput, SampledToken, SchedulerOutput

VOCAB = 97


def next_token(tokens: list[int] | tuple[int, ...], index: int) -> int:
    return (sum((i + 1) * t for i, t in enumerate(tokens)) * 31 + index * 7 + len(tokens)) % VOCAB


class FakeRunner:
    """Records what each step asked for and checks the plan's own consistency."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.steps: list[SchedulerOutput] = []

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        self.steps.append(plan)
        sampled = {}
        for s in plan.sequences:
            end = s.num_computed_tokens + len(s.token_ids)
            assert len(s.block_ids) * self.block_size >= end, "block table too short"
            if not s.sample:
                continue
            tokens = list(s.prompt_token_ids) + list(s.output_token_ids)
            assert len(tokens) == end, "sampled before the end of the known tokens"
            sampled[s.seq_id] = [
                SampledToken(next_token(tokens, s.sample_index + j)) for j in range(s.num_samples)
            ]
        return RunnerOutput(sampled=sampled)
