"""Contracts between the API, the engine, the scheduler and the runner (no torch here)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_N = 64  # completions per request
MAX_LOGPROBS = 20  # top-N logprobs per token


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token (or a stop string, applied by the API)
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # the client aborted the request
    ERROR = "error"  # the request failed (adapter load failure, error inside a step)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token. temperature 0 is greedy."""

    n: int = 1  # completions sharing the prompt's KV cache
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop tokens are suppressed until this many were generated
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0  # drop tokens whose probability is below min_p * p_max
    seed: int | None = None  # per-request seed: the same output whatever else is batched with it
    presence_penalty: float = 0.0  # OpenAI: subtract once for each token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # CTRL/HF: divide (positive) logits of prompt+output tokens
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; N >= 0: the sampled token's logprob plus the top N

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}]"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens must be in [0, max_tokens]"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k must be -1, 0 (off) or positive"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (0 < self.repetition_penalty <= 2, "repetition_penalty must be in (0, 2]"),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1
        )


@dataclass(frozen=True, slots=True)
class ScheduledSequence:
    """One sequence's share of a step: a prefill chunk, or one decode token."""

    seq_id: int
    token_ids: tuple[int, ...]  # tokens computed this step
    num_computed_tokens: int  # tokens already in the KV cache = position of token_ids[0]
    block_ids: Sequence[int]  # block table covering every token after this step
    adapter: str | None  # adapter name; None = base model
    sample: bool  # True when this step reaches the end of the known tokens: sample the next
    sampling: SamplingParams
    num_output_tokens: int = 0  # tokens generated so far (seeded sampling is keyed on it)
    # Read only while the step runs (references, not copies): for penalties and min_tokens.
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    num_samples: int = 1  # > 1 at the end of the prefill of an n > 1 request: one per completion
    sample_index: int = 0  # which completion of its request this sequence is (seeded sampling)


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    sequences: tuple[ScheduledSequence, ...]
    # KV blocks to copy before the forward pass (copy-on-write when n > 1 completions fork).
    block_copies: tuple[tuple[int, int], ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True, slots=True)
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None = None


@dataclass(frozen=True, slots=True)
class RunnerOutput:
    # seq_id -> num_samples sampled tokens (one unless the sequence forks into n completions)
    sampled: dict[int, list[SampledToken]] = field(default_factory=dict)
    # adapter slot -> routing decisions per expert this step (only when counting is enabled)
    expert_counts: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @property
    def sampled_token_ids(self) -> dict[int, int]:
        return {seq_id: tokens[0].token_id for seq_id, tokens in self.sampled.items()}


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """New output of one completion of one request, after one step."""

    request_id: str
    index: int  # which of the request's n completions
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    error: str | None = None  # set with finish_reason ERROR

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    logprobs: tuple[TokenLogprob, ...] = ()


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
