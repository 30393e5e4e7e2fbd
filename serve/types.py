"""Contracts between the API, the step loop and the runner (no torch here)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens reached


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token. temperature 0 is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None  # per-request seed: the same output whatever else is batched with it
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True, slots=True)
class ScheduledSequence:
    """One sequence's share of a step: a prefill chunk, or one decode token."""

    seq_id: int
    token_ids: tuple[int, ...]  # tokens computed this step
    num_computed_tokens: int  # tokens already in the KV cache = position of token_ids[0]
    block_ids: tuple[int, ...]  # block table covering every token after this step
    adapter: str | None  # adapter name; None = base model
    sample: bool  # True when this step reaches the end of the known tokens: sample the next
    sampling: SamplingParams
    num_output_tokens: int = 0  # tokens generated so far (seeded sampling is keyed on it)


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    sequences: tuple[ScheduledSequence, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)


@dataclass(frozen=True, slots=True)
class RunnerOutput:
    sampled_token_ids: dict[int, int] = field(default_factory=dict)  # seq_id -> next token


@dataclass(frozen=True, slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None


@dataclass(frozen=True, slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    adapter: str | None
    outputs: tuple[CompletionOutput, ...]
    finished: bool = True

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.outputs[0].token_ids
