"""503 when unhealthy or draining, and SIGTERM draining running requests before exit."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from server_support import tiny_server

from mixserve.api.adapter_roots import AdapterRoots
from mixserve.api.app import create_app
from mixserve.api.serving import ServerState
from mixserve.config import ServerConfig
from mixserve.metrics import Metrics


class _StubClient:
    def __init__(self, healthy: bool, draining: bool) -> None:
        self.healthy, self.draining, self.num_open_requests = healthy, draining, 0


@pytest.mark.parametrize(("healthy", "draining"), [(False, False), (True, True)])
def test_unhealthy_or_draining_engine_gets_503(healthy, draining):
    state = ServerState(
        client=_StubClient(healthy, draining),
        tokenizer=None,  # type: ignore[arg-type]
        config=ServerConfig(),
        metrics=Metrics(),
        roots=AdapterRoots([]),
        model_name="tiny",
        max_model_len=64,
    )
    transport = httpx.ASGITransport(app=create_app(state))

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
            chat = await c.post(
                "/v1/chat/completions",
                json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
            )
            return chat, await c.get("/health")

    import asyncio

    chat, health = asyncio.run(run())
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "service_unavailable"
    assert health.status_code == 503


def test_sigterm_drains_running_requests_then_exits(api_files):
    proc = tiny_server(api_files, "--drain-timeout", "60", kv_cache="64MiB", adapters=False)
    body = {
        "model": "model",
        "prompt": "go",
        "max_tokens": 300,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0,
    }
    seen: dict[str, object] = {"chunks": 0, "finish": None}
    started = threading.Event()

    def consume() -> None:
        with httpx.stream("POST", proc.base_url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                seen["chunks"] = int(seen["chunks"]) + 1
                started.set()
                if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                    seen["finish"] = chunk["choices"][0]["finish_reason"]

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(60), proc.log()
    proc.terminate()
    reader.join(120)
    assert seen["finish"] == "length", proc.log()  # the running request finished in full
    assert proc.stop(timeout=60) == 0, proc.log()
