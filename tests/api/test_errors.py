"""Every error case answers with its status and an OpenAI-shaped body (real server, httpx)."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest
from server_support import metric, tiny_server

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def server(api_files):
    root = api_files["root"]
    escape = os.path.join(api_files["adapters"], "escape")
    if not os.path.lexists(escape):  # a symlink inside the root pointing outside it
        os.symlink(os.path.join(api_files["outside"], "secret"), escape)
    broken = os.path.join(api_files["adapters"], "broken")
    os.makedirs(broken, exist_ok=True)
    with open(os.path.join(broken, "adapter_config.json"), "w") as f:
        f.write('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}')
    with open(os.path.join(broken, "adapter_model.safetensors"), "wb") as f:
        f.write(b"truncated")
    del root
    proc = tiny_server(
        api_files,
        "--api-key",
        KEY,
        "--max-body-size",
        "20KiB",
        "--max-tokens-limit",
        "500",
        "--max-prompt-tokens",
        "200",
        "--max-queue",
        "2",
        "--served-model-name",
        "tiny",
        kv_cache="64MiB",
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as c:
        yield c


def _chat(**extra):
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        **extra,
    }


def _check(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def test_api_key_is_required_on_v1_routes(server):
    base = server.base_url
    _check(httpx.post(base + "/v1/chat/completions", json=_chat()), 401, "invalid_api_key")
    wrong = {"Authorization": "Bearer nope"}
    _check(httpx.get(base + "/v1/models", headers=wrong), 401, "invalid_api_key")
    assert httpx.get(base + "/health").status_code == 200  # not behind the key
    assert httpx.get(base + "/metrics").status_code == 200
    assert httpx.get(base + "/version").json()["version"]


@pytest.mark.parametrize(
    "body",
    [
        _chat(temperature=5),
        _chat(top_p=0),
        _chat(n=0),
        _chat(max_tokens=0),
        _chat(top_logprobs=3),  # without logprobs
        _chat(stop=["a", "b", "c", "d", "e"]),
        _chat(tools=[{"type": "function"}]),
        _chat(messages=[]),
        {"messages": [{"role": "user", "content": "hi"}]},  # no model
        _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
    ],
)
def test_invalid_requests_get_400(http, body):
    error = _check(http.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"


def test_malformed_json_gets_400(http):
    _check(
        http.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        ),
        400,
    )


def test_limits(http):
    _check(http.post("/v1/chat/completions", json=_chat(max_tokens=501)), 400)
    long_prompt = "x" * 300
    _check(
        http.post("/v1/completions", json={"model": "tiny", "prompt": long_prompt}),
        400,
        "context_length_exceeded",
    )
    _check(
        http.post("/v1/completions", json={"model": "tiny", "prompt": "y" * 30_000}),
        413,
        "request_too_large",
    )


def test_unknown_model_gets_404(http):
    _check(
        http.post("/v1/chat/completions", json=_chat(model="no-such-adapter")),
        404,
        "model_not_found",
    )
    _check(
        http.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model_not_found"
    )


@pytest.mark.parametrize("name", ["../outside/secret", "..", "ad0/../ad1", "/etc/passwd", "a\\b"])
def test_path_traversal_is_refused(http, name):
    _check(http.post("/v1/chat/completions", json=_chat(model=name)), 400)


def test_symlink_escape_is_refused(http):
    _check(
        http.post("/v1/chat/completions", json=_chat(model="escape")), 400, "adapter_outside_roots"
    )
    names = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert "escape" not in names and "ad0" in names


def test_adapter_that_fails_to_load_is_a_clear_error(http):
    error = _check(
        http.post("/v1/chat/completions", json=_chat(model="broken")), 400, "adapter_load_failed"
    )
    assert "broken" in error["message"]
    ok = http.post("/v1/chat/completions", json=_chat(model="ad0"))
    assert ok.status_code == 200


def test_load_endpoints_are_off_unless_enabled(http, api_files):
    r = http.post(
        "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": api_files["adapters"]}
    )
    _check(r, 403, "adapter_loading_disabled")


def test_full_queue_gets_429(server, http):
    body = _chat(max_tokens=480, stream=True)  # long enough to hold the queue
    body["ignore_eos"] = True
    opened, release = [], threading.Event()

    def hold():
        with httpx.stream(
            "POST",
            server.base_url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        ) as r:
            opened.append(r.status_code)
            for _ in r.iter_lines():
                if release.is_set():
                    break

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(200):  # both streams open and running in the engine
        text = http.get("/metrics").text
        if len(opened) == 2 and metric(text, "mixserve:num_requests_running") == 2:
            break
        time.sleep(0.05)
    try:
        assert opened == [200, 200]
        _check(http.post("/v1/chat/completions", json=_chat()), 429, "queue_full")
    finally:
        release.set()
        for t in threads:
            t.join()
