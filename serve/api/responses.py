"""OpenAI response objects and stream chunks, shaped as OpenAI's API returns them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mixserve.types import TokenLogprob


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class LogprobFormatter:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def chat(self, logprobs: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
        out = []
        for lp in logprobs:
            text = self.token(lp.token_id)
            out.append(
                {
                    "token": text,
                    "logprob": lp.logprob,
                    "bytes": list(text.encode("utf-8")),
                    "top_logprobs": [
                        {"token": (t := self.token(tid)), "logprob": v, "bytes": list(t.encode())}
                        for tid, v in lp.top
                    ],
                }
            )
        return out

    def completion(self, logprobs: Sequence[TokenLogprob], text_offset: int) -> dict[str, Any]:
        tokens, offsets, top = [], [], []
        for lp in logprobs:
            text = self.token(lp.token_id)
            tokens.append(text)
            offsets.append(text_offset)
            text_offset += len(text)
            top.append({self.token(tid): v for tid, v in lp.top} if lp.top else None)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": top,
            "text_offset": offsets,
        }


def chat_response(
    request_id: str, created: int, model: str, choices: list[dict[str, Any]], usage_: dict
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: Any) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def chat_chunk(
    request_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_: dict | None = None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def chat_delta(index: int, delta: dict[str, Any], finish_reason: str | None, logprobs: Any) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_response(
    request_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_: dict | None,
    *,
    chunk: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: Any) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
