"""Bounded soak: 200 requests over 10 adapters from 32 concurrent clients, some hanging up."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from server_support import metric, tiny_server

NUM_REQUESTS, NUM_CLIENTS = 200, 32


@pytest.fixture(scope="module")
def server(api_files):
    proc = tiny_server(
        api_files, "--adapter-slots", "4", "--max-queue", "256", "--served-model-name", "tiny"
    )
    yield proc
    assert proc.stop() == 0, proc.log()


async def _one(http: httpx.AsyncClient, i: int) -> tuple[str, int]:
    """('length'|'stop', completion tokens) or ('hung_up', 0)."""
    adapter = f"ad{i % 10}" if i % 11 else "tiny"
    hang_up = i % 7 == 0
    body = {
        "model": adapter,
        "prompt": f"request {i}",
        "temperature": 0.8,
        "seed": i,
        "max_tokens": 400 if hang_up else 4 + i % 13,
        "ignore_eos": True,
    }
    if hang_up or i % 2:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        finish, tokens, chunks = None, 0, 0
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                chunks += 1
                if hang_up and chunks == 3:
                    return "hung_up", 0  # leaving the block closes the connection mid-stream
                if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                    finish = chunk["choices"][0]["finish_reason"]
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        assert finish is not None
        return finish, tokens
    r = await http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    return data["choices"][0]["finish_reason"], data["usage"]["completion_tokens"]


async def _soak(base_url: str) -> list[tuple[str, int]]:
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(NUM_REQUESTS):
        queue.put_nowait(i)
    results: list[tuple[str, int]] = []

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
            while not queue.empty():
                results.append(await _one(http, queue.get_nowait()))

    await asyncio.gather(*(worker() for _ in range(NUM_CLIENTS)))
    return results


def test_soak(server):
    results = asyncio.run(_soak(server.base_url))
    assert len(results) == NUM_REQUESTS
    hung_up = sum(1 for kind, _ in results if kind == "hung_up")
    finished = [r for r in results if r[0] != "hung_up"]
    assert hung_up == len(range(0, NUM_REQUESTS, 7))
    assert {kind for kind, _ in finished} <= {"length", "stop"}

    deadline = time.monotonic() + 60
    while True:  # aborts of hung-up requests land asynchronously
        text = httpx.get(server.base_url + "/metrics").text
        running = metric(text, "mixserve:num_requests_running")
        waiting = metric(text, "mixserve:num_requests_waiting")
        aborted = metric(text, "mixserve:request_success_total", finish_reason="abort")
        if (running, waiting, aborted) == (0, 0, hung_up) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (running, waiting) == (0, 0), server.log()
    assert aborted == hung_up
    for reason in ("length", "stop"):
        seen = sum(1 for kind, _ in finished if kind == reason)
        assert metric(text, "mixserve:request_success_total", finish_reason=reason) == seen
    assert metric(text, "mixserve:generation_tokens_total") >= sum(t for _, t in finished)
    assert metric(text, "mixserve:kv_cache_usage_perc") == 0  # no block referenced
    assert metric(text, "mixserve:adapter_evictions_total", tier="slot") > 0  # 10 adapters, 4 slots
    adapters = httpx.get(server.base_url + "/v1/adapters").json()["data"]
    assert all(row["in_flight"] == 0 for row in adapters)  # no adapter reference left
