"""POST /v1/completions: one or many prompts (text or token ids), n choices each, merged into
one answer (JSON) or one SSE stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from mixserve.api import responses as R
from mixserve.api.errors import bad_request
from mixserve.api.generation import Generation, GenerationFailed, start_generation
from mixserve.api.protocol import CompletionRequest
from mixserve.api.serving import ServerState, max_tokens_for, prepare, run_watched, sse_response


async def completion(
    state: ServerState, body: CompletionRequest, http_request: Request
) -> Response:
    body.check_supported()
    adapter, model = await prepare(state, body)
    prompts = body.prompts()
    token_lists = [
        p if isinstance(p, list) else state.tokenizer.encode(p, add_special_tokens=False)
        for p in prompts
    ]
    params_list = [
        body.sampling_params(max_tokens_for(state, body.max_tokens or 16, len(ids)), body.logprobs)
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

        return JSONResponse(await run_watched(http_request, gens, collect))

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

    return sse_response(events(), gens)
