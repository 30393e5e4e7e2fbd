"""Request and sequence state held by the scheduler (pure Python)."""

from __future__ import annotations

import enum
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

from mixserve.types import FinishReason, SamplingParams, TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)  # identity semantics: lists remove by identity
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    adapter: str | None
    adapter_key: Hashable  # prefix-cache identity: (name, weights uid), or None for the base
    arrival: int  # admission order; lower runs first
    sequences: list[Sequence] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    forked: bool = False  # n > 1: the other completions exist once the prompt is computed

    @property
    def finished(self) -> bool:
        done = all(s.status is SequenceStatus.FINISHED for s in self.sequences)
        return done and (self.forked or self.sampling.n == 1)


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int  # which of the request's n completions
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_bypassed: int = 0  # later requests admitted while the adapter cap held this one back

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    @property
    def priority(self) -> tuple[int, int]:
        return (self.request.arrival, self.index)

    def token_slice(self, start: int, end: int) -> tuple[int, ...]:
        prompt = self.request.prompt_token_ids
        n = len(prompt)
        if end <= n:
            return tuple(prompt[start:end])
        if start >= n:
            return tuple(self.output_token_ids[start - n : end - n])
        return tuple(prompt[start:]) + tuple(self.output_token_ids[: end - n])

    def all_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids + self.output_token_ids
