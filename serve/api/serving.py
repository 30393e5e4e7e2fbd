"""Chat and text completions: validate, resolve the model/adapter, run, answer (JSON or SSE)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse

from mixserve.api import responses as R
from mixserve.api.adapter_roots import AdapterRoots
from mixserve.api.errors import APIError, bad_request, error_body, model_not_found, unavailable
from mixserve.api.generation import Generation, GenerationFailed, start_generation
from mixserve.api.protocol import ChatCompletionRequest, CompletionRequest, _GenerationBody
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


def _max_tokens(state: ServerState, requested: int | None, prompt_len: int) -> int:
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


async def _until_disconnect(http_request: Request, gens: list[Generation]) -> None:
    while True:
        await asyncio.sleep(0.25)
        if await http_request.is_disconnected():
            for gen in gens:
                await gen.close()
            return


async def _run_watched(
    http_request: Request, gens: list[Generation], work: Callable[[], Awaitable[Any]]
) -> Any:
    """Run a non-streaming response; a client that disconnects aborts its requests."""
    watcher = asyncio.create_task(_until_disconnect(http_request, gens))
    try:
        return await work()
    finally:
        watcher.cancel()


def _sse(events: AsyncIterator[dict], gens: list[Generation]) -> EventSourceResponse:
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


async def _prepare(state: ServerState, body: _GenerationBody) -> tuple[str | None, str]:
    state.check_ready()
    return await resolve_adapter(state, body.model), body.model


async def chat_completion(
    state: ServerState, body: ChatCompletionRequest, http_request: Request
) -> Response:
    body.check_supported()
    logprobs = body.logprobs_count()
    adapter, model = await _prepare(state, body)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        prompt_ids = list(
            state.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=body.add_generation_prompt,
                tokenize=True,
                return_dict=False,
            )
        )
    except Exception as exc:  # noqa: BLE001 - template errors are the request's fault
        raise bad_request(f"chat template failed: {exc}", "messages") from exc
    params = body.sampling_params(
        _max_tokens(state, body.requested_max_tokens(), len(prompt_ids)), logprobs
    )
    request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    gen = await start_generation(
        state.client,
        state.metrics,
        state.tokenizer,
        request_id,
        prompt_ids,
        params,
        adapter,
        body.stop_strings,
        body.skip_special_tokens,
    )
    fmt = R.LogprobFormatter(state.tokenizer)

    if not body.stream:

        async def collect() -> dict:
            texts = [""] * params.n
            reasons: list[str | None] = [None] * params.n
            lps: list[list] = [[] for _ in range(params.n)]
            try:
                async for u in gen.updates():
                    texts[u.index] += u.text
                    lps[u.index].extend(u.logprobs)
                    reasons[u.index] = u.finish_reason or reasons[u.index]
            except GenerationFailed as exc:
                raise exc.api_error() from exc
            finally:
                await gen.close()
            choices = [
                R.chat_choice(
                    i,
                    texts[i],
                    reasons[i],
                    {"content": fmt.chat(lps[i])} if logprobs is not None else None,
                )
                for i in range(params.n)
            ]
            return R.chat_response(
                request_id, created, model, choices, R.usage(len(prompt_ids), gen.completion_tokens)
            )

        return JSONResponse(await _run_watched(http_request, [gen], collect))

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[dict]:
        for i in range(params.n):
            yield R.chat_chunk(
                request_id,
                created,
                model,
                [R.chat_delta(i, {"role": "assistant", "content": ""}, None, None)],
            )
        async for u in gen.updates():
            delta = {"content": u.text} if u.text or u.finish_reason is None else {}
            lp = {"content": fmt.chat(u.logprobs)} if logprobs is not None else None
            if u.text or u.logprobs:
                yield R.chat_chunk(
                    request_id, created, model, [R.chat_delta(u.index, delta, None, lp)]
                )
            if u.finish_reason is not None:
                yield R.chat_chunk(
                    request_id, created, model, [R.chat_delta(u.index, {}, u.finish_reason, None)]
                )
        if include_usage:
            yield R.chat_chunk(
                request_id, created, model, [], R.usage(len(prompt_ids), gen.completion_tokens)
            )

    return _sse(events(), [gen])


async def completion(
    state: ServerState, body: CompletionRequest, http_request: Request
) -> Response:
    body.check_supported()
    adapter, model = await _prepare(state, body)
    prompts = body.prompts()
    token_lists = [
        p if isinstance(p, list) else state.tokenizer.encode(p, add_special_tokens=False)
        for p in prompts
    ]
    params_list = [
        body.sampling_params(_max_tokens(state, body.max_tokens or 16, len(ids)), body.logprobs)
        for ids in token_lists
    ]
    request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    gens: list[Generation] = []
    try:
        for i, (ids, params) in enumerate(zip(token_lists, params_list, strict=True)):
            if not ids:
                raise bad_request("prompt must not be empty", "prompt")
            gens.append(
                await start_generation(
                    state.client,
                    state.metrics,
                    state.tokenizer,
                    f"{request_id}-{i}",
                    list(ids),
                    params,
                    adapter,
                    body.stop_strings,
                    body.skip_special_tokens,
                )
            )
    except BaseException:
        for gen in gens:
            await gen.close()
        raise
    n = body.n
    fmt = R.LogprobFormatter(state.tokenizer)
    offsets = [0] * (len(gens) * n)

    async def merged() -> AsyncIterator[tuple[int, Any]]:
        queue: asyncio.Queue[tuple[int, Any] | None] = asyncio.Queue()

        async def pump(p: int, gen: Generation) -> None:
            try:
                async for u in gen.updates():
                    await queue.put((p, u))
            except GenerationFailed as exc:
                await queue.put((p, exc))
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(p, g)) for p, g in enumerate(gens)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item[1], GenerationFailed):
                    raise item[1]
                yield item
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def logprob_block(index: int, u: Any) -> Any:
        if body.logprobs is None:
            return None
        block = fmt.completion(u.logprobs, offsets[index])
        offsets[index] += len(u.text)
        return block

    def usage() -> dict:
        return R.usage(sum(len(t) for t in token_lists), sum(g.completion_tokens for g in gens))

    if not body.stream:

        async def collect() -> dict:
            total = len(gens) * n
            texts, reasons = [""] * total, [None] * total
            blocks: list[list] = [[] for _ in range(total)]
            try:
                async for p, u in merged():
                    index = p * n + u.index
                    texts[index] += u.text
                    reasons[index] = u.finish_reason or reasons[index]
                    blocks[index].extend(u.logprobs)
            except GenerationFailed as exc:
                raise exc.api_error() from exc
            finally:
                for gen in gens:
                    await gen.close()
            choices = [
                R.completion_choice(
                    i,
                    texts[i],
                    reasons[i],
                    fmt.completion(blocks[i], 0) if body.logprobs is not None else None,
                )
                for i in range(total)
            ]
            return R.completion_response(request_id, created, model, choices, usage())

        return JSONResponse(await _run_watched(http_request, gens, collect))

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[dict]:
        async for p, u in merged():
            index = p * n + u.index
            if u.text or u.logprobs or u.finish_reason:
                choice = R.completion_choice(
                    index, u.text, u.finish_reason, logprob_block(index, u)
                )
                yield R.completion_response(request_id, created, model, [choice], None, chunk=True)
        if include_usage:
            yield R.completion_response(request_id, created, model, [], usage(), chunk=True)

    return _sse(events(), gens)
