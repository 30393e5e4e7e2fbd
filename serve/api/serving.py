"""What the chat and text completion routes share: server state, adapter resolution, token
limits, disconnect watching and the SSE response (serving_chat.py, serving_completions.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from sse_starlette.sse import EventSourceResponse

from mixserve.api.adapter_roots import AdapterRoots
from mixserve.api.errors import APIError, bad_request, error_body, model_not_found, unavailable
from mixserve.api.generation import Generation, GenerationFailed
from mixserve.api.protocol import _GenerationBody
from mixserve.config import ServerConfig
from mixserve.engine import EngineClient
from mixserve.metrics import Metrics


@dataclass(slots=True)
class ServerState:
    client: EngineClient
    tokenizer: Any
    config: ServerConfig
    metrics: Metrics
    roots: AdapterRoots
    model_name: str
    max_model_len: int
    draining: bool = False

    def check_ready(self) -> None:
        if self.draining or self.client.draining:
            raise unavailable("the server is shutting down")
        if not self.client.healthy:
            raise unavailable("the engine is not running")
        if self.client.num_open_requests >= self.config.max_queue:
            raise APIError(
                429,
                "too many requests are queued; retry later",
                type="rate_limit_error",
                code="queue_full",
            )


async def resolve_adapter(state: ServerState, model: str) -> str | None:
    """None for the base model; else the adapter name, registered with the engine if it was found
    under an adapter root (idempotent, so concurrent first requests register it once)."""
    if model in (state.model_name, "default"):
        return None
    known = await state.client.call(
        lambda core: core.pager is not None and core.pager.has_source(model)
    )
    if known:
        return model
    path = state.roots.resolve(model)
    if path is None:
        raise model_not_found(model)

    def register(core: Any) -> None:
        if core.pager is None:
            raise model_not_found(model)
        if not core.pager.has_source(model):
            core.pager.add_source(model, path)

    await state.client.call(register)
    return model


def max_tokens_for(state: ServerState, requested: int | None, prompt_len: int) -> int:
    limit = state.config.max_prompt_tokens or state.max_model_len
    if prompt_len > limit or prompt_len >= state.max_model_len:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens; the limit is "
            f"{min(limit, state.max_model_len - 1)}",
            param="messages",
            code="context_length_exceeded",
        )
    room = state.max_model_len - prompt_len
    if requested is None:
        return min(state.config.max_tokens_limit, room)
    if requested > state.config.max_tokens_limit:
        raise bad_request(f"max_tokens must be <= {state.config.max_tokens_limit}", "max_tokens")
    if requested > room:
        raise APIError(
            400,
            f"prompt ({prompt_len}) + max_tokens ({requested}) exceed the "
            f"context length ({state.max_model_len})",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


async def until_disconnect(http_request: Request, gens: list[Generation]) -> None:
    while True:
        await asyncio.sleep(0.25)
        if await http_request.is_disconnected():
            for gen in gens:
                await gen.close()
            return


async def run_watched(
    http_request: Request, gens: list[Generation], work: Callable[[], Awaitable[Any]]
) -> Any:
    """Run a non-streaming response; a client that disconnects aborts its requests."""
    watcher = asyncio.create_task(until_disconnect(http_request, gens))
    try:
        return await work()
    finally:
        watcher.cancel()


def sse_response(events: AsyncIterator[dict], gens: list[Generation]) -> EventSourceResponse:
    async def generate() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield json.dumps(event)
            yield "[DONE]"
        except GenerationFailed as exc:
            error = exc.api_error()
            yield json.dumps(error_body(error.message, error.type, error.param, error.code))
            yield "[DONE]"
        finally:  # also when the client disconnects (the generator is cancelled)
            for gen in gens:
                await gen.close()

    return EventSourceResponse(generate(), ping=15)


async def prepare(state: ServerState, body: _GenerationBody) -> tuple[str | None, str]:
    state.check_ready()
    return await resolve_adapter(state, body.model), body.model
