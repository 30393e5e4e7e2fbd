"""From an accepted request to text: engine stream -> per-completion detokenized updates.

The first update is awaited before any response is sent, so a request that fails before its
first token (e.g. its adapter could not be loaded) becomes a proper HTTP error.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from mixserve.adapters import AdapterError, AdapterNotFoundError
from mixserve.api.detokenizer import IncrementalDetokenizer
from mixserve.api.errors import APIError, bad_request, model_not_found, unavailable
from mixserve.engine import EngineClient, EngineDeadError, EngineShuttingDownError
from mixserve.metrics import Metrics, RequestRecord
from mixserve.types import FinishReason, SamplingParams, TokenDelta, TokenLogprob

_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


@dataclass(frozen=True, slots=True)
class Update:
    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...]
    finish_reason: str | None  # "stop" / "length" when this completion ends


@dataclass(slots=True)
class _Completion:
    detok: IncrementalDetokenizer
    num_tokens: int = 0
    done: bool = False


@dataclass(slots=True)
class Generation:
    """One engine request and its n completions."""

    stream: AsyncIterator[TokenDelta]
    completions: list[_Completion]
    record: RequestRecord
    metrics: Metrics
    adapter: str | None
    pending: list[Update] = field(default_factory=list)
    finish_reason: str = "abort"  # for metrics; set as completions end

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.completions)

    def _updates(self, delta: TokenDelta) -> list[Update]:
        if delta.finish_reason is FinishReason.ERROR:
            raise GenerationFailed(delta.error or "request failed", self.adapter, self.record)
        completion = self.completions[delta.index]
        if completion.done:
            return []  # ended by a stop string; the engine may still be running it
        if delta.token_ids:
            self.record.on_tokens(len(delta.token_ids))
            completion.num_tokens += len(delta.token_ids)
        text = completion.detok.add(delta.token_ids)
        reason = None
        if completion.detok.stopped:
            reason = "stop"
        elif delta.finish_reason is not None:
            text += completion.detok.finish()
            reason = _REASONS.get(delta.finish_reason, "stop")
        if reason is not None:
            completion.done = True
            if delta.index == 0:
                self.finish_reason = reason
        return [Update(delta.index, text, delta.logprobs, reason)]

    async def first(self) -> None:
        """Wait for the first output (or failure) before answering the HTTP request."""
        async for delta in self.stream:
            self.pending.extend(self._updates(delta))
            if self.pending or all(c.done for c in self.completions):
                return

    async def updates(self) -> AsyncIterator[Update]:
        for update in self.pending:
            yield update
        self.pending.clear()
        if all(c.done for c in self.completions):
            return
        async for delta in self.stream:
            for update in self._updates(delta):
                yield update
            if all(c.done for c in self.completions):
                return

    async def close(self) -> None:
        """Always called: ends the engine request if it still runs (client gone, stop string)
        and records the request's metrics."""
        aclose = getattr(self.stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        self.metrics.on_request_finished(self.record, self.finish_reason, time.monotonic())


class GenerationFailed(Exception):
    def __init__(self, message: str, adapter: str | None, record: RequestRecord) -> None:
        super().__init__(message)
        self.adapter = adapter
        self.before_output = record.first_token is None

    def api_error(self) -> APIError:
        if (
            self.adapter is not None
            and self.before_output
            and f"adapter '{self.adapter}'" in str(self)
        ):
            return APIError(
                400,
                f"adapter could not be loaded: {self}",
                param="model",
                code="adapter_load_failed",
            )
        return APIError(500, str(self), type="internal_error", code="internal_error")


async def start_generation(
    client: EngineClient,
    metrics: Metrics,
    tokenizer: Any,
    request_id: str,
    prompt_ids: list[int],
    params: SamplingParams,
    adapter: str | None,
    stop: Sequence[str],
    skip_special_tokens: bool,
) -> Generation:
    """Submit to the engine and wait for the first output; errors become APIError."""
    try:
        stream = await client.add_request(request_id, prompt_ids, params, adapter)
    except AdapterNotFoundError as exc:
        raise model_not_found(adapter or "") from exc
    except AdapterError as exc:
        raise bad_request(str(exc), "model") from exc
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    except (EngineDeadError, EngineShuttingDownError) as exc:
        raise unavailable(str(exc)) from exc
    completions = [
        _Completion(
            IncrementalDetokenizer(tokenizer, stop, skip_special_tokens=skip_special_tokens)
        )
        for _ in range(params.n)
    ]
    generation = Generation(
        stream, completions, RequestRecord(adapter, len(prompt_ids)), metrics, adapter
    )
    try:
        await generation.first()
    except GenerationFailed as exc:
        generation.finish_reason = "error"
        await generation.close()
        raise exc.api_error() from exc
    except BaseException:
        await generation.close()
        raise
    return generation
