"""The official openai client against a real server process on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest
from server_support import metric, tiny_server

GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def server(api_files):
    proc = tiny_server(
        api_files,
        "--enable-adapter-loading",
        "--adapter-slots",
        "4",
        "--served-model-name",
        "tiny",
        kv_cache="64MiB",
    )
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_base_model_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny"
    assert {f"ad{i}" for i in range(10)} <= set(ids)


def test_chat_completion(client):
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], **GREEDY
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_equals_non_streamed(client):
    messages = [{"role": "user", "content": "count to three"}]
    whole = client.chat.completions.create(model="ad0", messages=messages, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model="ad0",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens
    )


def test_adapters_change_the_output(client):
    messages = [{"role": "user", "content": "say something"}]
    outputs = {
        model: client.chat.completions.create(model=model, messages=messages, **GREEDY)
        .choices[0]
        .message.content
        for model in ("tiny", "ad0", "ad1", "ad2")
    }
    assert len(set(outputs.values())) == 4


def test_completions_stream_and_not(client):
    whole = client.completions.create(model="ad1", prompt="once upon a time", **GREEDY)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    streamed = list(
        client.completions.create(model="ad1", prompt="once upon a time", stream=True, **GREEDY)
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    batch = client.completions.create(
        model="tiny", prompt=["a", "b c"], n=2, temperature=0.7, max_tokens=4, seed=3
    )
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]


def test_sampling_options(client):
    messages = [{"role": "user", "content": "pick a word"}]
    seeded = {
        "model": "ad2",
        "messages": messages,
        "temperature": 1.0,
        "max_tokens": 6,
        "seed": 1234,
    }
    first = client.chat.completions.create(**seeded).choices[0].message.content
    assert client.chat.completions.create(**seeded).choices[0].message.content == first
    two = client.chat.completions.create(
        model="ad2", messages=messages, n=2, temperature=1.0, max_tokens=6, seed=5
    )
    assert [c.index for c in two.choices] == [0, 1]
    lp = client.chat.completions.create(
        model="ad2", messages=messages, logprobs=True, top_logprobs=2, **GREEDY
    )
    content = lp.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob <= t.top_logprobs[0].logprob + 1e-6 for t in content)
    base = client.completions.create(model="tiny", prompt="abc", **GREEDY).choices[0].text
    if len(base) >= 3:
        cut = client.completions.create(model="tiny", prompt="abc", stop=[base[2:4]], **GREEDY)
        assert cut.choices[0].text == base[: base.find(base[2:4])]
        assert cut.choices[0].finish_reason == "stop"


def test_hot_loaded_adapter_loads_once_for_concurrent_first_requests(server, client):
    before = metric(
        httpx.get(server.base_url + "/metrics").text, "mixserve:adapter_loads_total", result="ok"
    )
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(client.completions.create, model="ad7", prompt=f"x{i}", **GREEDY)
            for i in range(8)
        ]
        results = [f.result() for f in futures]
    assert all(r.choices[0].finish_reason for r in results)
    after = metric(
        httpx.get(server.base_url + "/metrics").text, "mixserve:adapter_loads_total", result="ok"
    )
    assert after - before == 1
    rows = httpx.get(server.base_url + "/v1/adapters").json()["data"]
    ad7 = next(r for r in rows if r["name"] == "ad7")
    assert ad7["residency"] in ("device", "host") and ad7["in_flight"] == 0


def test_load_and_unload_endpoints(server, client, api_files):
    url = server.base_url + "/v1"
    path = f"{api_files['adapters']}/ad4"
    r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "custom", "lora_path": path})
    assert r.status_code == 200 and "Success" in r.text
    out = client.completions.create(model="custom", prompt="hi", **GREEDY)
    assert out.choices[0].finish_reason == "length"
    r = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "custom"})
    assert r.status_code == 200 and "removed" in r.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="custom", prompt="hi", **GREEDY)
    assert httpx.post(url + "/unload_lora_adapter", json={"lora_name": "custom"}).status_code == 404
