"""POST /v1/chat/completions: chat template, run, answer as one JSON or as SSE chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from mixserve.api import responses as R
from mixserve.api.errors import bad_request
from mixserve.api.generation import GenerationFailed, start_generation
from mixserve.api.protocol import ChatCompletionRequest
from mixserve.api.serving import ServerState, max_tokens_for, prepare, run_watched, sse_response


async def chat_completion(
    state: ServerState, body: ChatCompletionRequest, http_request: Request
) -> Response:
    body.check_supported()
    logprobs = body.logprobs_count()
    adapter, model = await prepare(state, body)
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
        max_tokens_for(state, body.requested_max_tokens(), len(prompt_ids)), logprobs
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

        return JSONResponse(await run_watched(http_request, [gen], collect))

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

    return sse_response(events(), [gen])
