"""Ray Serve scale-out on CPU: adapter affinity, streaming through the Ray route, failover.

One local Ray (2 CPUs, no dashboard) runs the app of `mixserve.ray_serve` with 2 engine
replicas of the tiny model; every request goes through Serve's HTTP proxy on 127.0.0.1. The
tests share the deployment and run in file order (the last one kills a replica). Skipped when
Ray Serve is not installed (`pip install -e ".[ray]"`).
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from server_support import free_port  # noqa: E402 - after the skip
from support.adapter_files import MLP, BaseDims, write_adapter  # noqa: E402
from support.tiny_models import save_tiny_model, save_tiny_tokenizer, tiny_config  # noqa: E402

from mixserve.ray_serve import REPLICA_HEADER, app_builder, parse_app_args  # noqa: E402

APP = "mixserve"
ADAPTERS = ("ad0", "ad1", "ad2", "ad3")
TIMEOUT = httpx.Timeout(60.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_serve")
    model = save_tiny_model(str(root / "model"), "llama", seed=11)
    save_tiny_tokenizer(model)
    dims = BaseDims.of(tiny_config("llama"))
    for i, name in enumerate(ADAPTERS):
        strategy = "mixlora" if i % 2 == 0 else None
        write_adapter(
            str(root / "adapters" / name),
            dims,
            strategy,
            r=8,
            num_experts=4,
            targets=MLP if strategy else ("q_proj", "v_proj"),
            seed=300 + i,
        )
    return {"model": model, "adapters": str(root / "adapters")}


@pytest.fixture(scope="module")
def base_url(files):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = app_builder(
            {
                "model": files["model"],
                "adapter_dirs": files["adapters"],
                "no_demo_adapters": "true",
                "served_model_name": "tiny",
                "kv_cache_memory": "32MiB",
                "adapter_slots": "4",
                "num_replicas": "2",
                "num_cpus": "0.5",
                "torch_threads": "1",
                "max_adapters_per_replica": "4",
            }
        )
        serve.run(app, name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _chat(base_url: str, model: str, **extra: object) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 8,
        "temperature": 0,
        **extra,
    }
    return httpx.post(base_url + "/v1/chat/completions", json=body, timeout=TIMEOUT)


def _replica_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers[REPLICA_HEADER]


def _stats(base_url: str) -> dict[str, dict]:
    reply = httpx.get(base_url + "/v1/replicas", params={"expected": 2}, timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    return {s["replica"]: s for s in reply.json()["data"]}


def _many(base_url: str, model: str, count: int) -> list[str]:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: _chat(base_url, model), range(count)))
    return [_replica_of(r) for r in replies]


def _actor(name: str):
    """The Ray actor of a replica (named by its stats), in whatever namespace Serve uses."""
    found = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == name]
    assert len(found) == 1, found
    return ray.get_actor(name, namespace=found[0]["namespace"])


def _sse(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_app_arguments_are_the_serve_flags(monkeypatch):
    monkeypatch.delenv("MIXSERVE_ADAPTER_DIRS", raising=False)
    engine, server, ray_args = parse_app_args(
        {
            "model": "/m",
            "adapter_dirs": "/a:/b",
            "no-demo-adapters": "true",
            "enable_adapter_loading": "false",
            "kv_cache_memory": "64MiB",
            "num_replicas": "3",
            "num_gpus": "1",
        }
    )
    assert engine.model.model == "/m" and engine.cache.kv_cache_memory_bytes == 64 * 2**20
    assert server.adapter_dirs == ("/a", "/b")
    assert not server.demo_adapters and not server.enable_adapter_loading
    assert ray_args == {"num_replicas": 3, "num_gpus": 1.0}
    with pytest.raises(ValueError, match="unknown argument"):
        parse_app_args({"no_such_flag": "1"})


def test_requests_for_an_adapter_stick_to_the_replica_that_loaded_it(base_url):
    assert len(_stats(base_url)) == 2
    first = _replica_of(_chat(base_url, "ad0"))
    time.sleep(1.5)  # the replica pushes its resident ids to Ray's routers every 0.1 s
    assert set(_many(base_url, "ad0", 12)) == {first}

    # Another adapter goes to the replica holding the fewest (none yet): the other one.
    second = _replica_of(_chat(base_url, "ad1"))
    time.sleep(1.5)
    assert second != first
    assert set(_many(base_url, "ad1", 8)) == {second}
    assert set(_many(base_url, "ad0", 4)) == {first}

    stats = _stats(base_url)
    assert sum(s["resident_loads"].get("ad0", 0) for s in stats.values()) == 1
    assert sum(s["resident_loads"].get("ad1", 0) for s in stats.values()) == 1
    assert stats[first]["resident_loads"] == {"ad0": 1}
    assert stats[second]["resident_loads"] == {"ad1": 1}
    # One load from disk per adapter, on its own replica only.
    assert stats[first]["pager"]["disk_loads"] == 1
    assert stats[second]["pager"]["disk_loads"] == 1
    assert stats[first]["requests"]["ad0"] == 1 + 12 + 4
    assert stats[second]["requests"]["ad1"] == 1 + 8


def test_routes_behind_the_ray_proxy(base_url):
    assert httpx.get(base_url + "/health", timeout=TIMEOUT).json() == {"status": "ok"}
    ids = [m["id"] for m in httpx.get(base_url + "/v1/models", timeout=TIMEOUT).json()["data"]]
    assert ids[0] == "tiny" and set(ADAPTERS) <= set(ids)
    base = _chat(base_url, "tiny")
    assert base.status_code == 200 and base.json()["object"] == "chat.completion"
    missing = _chat(base_url, "no-such-adapter")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    bad = httpx.post(base_url + "/v1/completions", json={"model": "ad0"}, timeout=TIMEOUT)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_streaming_through_the_ray_route(base_url):
    body = {
        "model": "ad0",
        "messages": [{"role": "user", "content": "tell me"}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST", base_url + "/v1/chat/completions", json=body, timeout=TIMEOUT
    ) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = _sse(reply)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    whole = _chat(base_url, "ad0", max_tokens=12, messages=body["messages"])
    assert text == whole.json()["choices"][0]["message"]["content"]  # greedy: same text

    completion = {"model": "ad1", "prompt": "abc", "max_tokens": 6, "stream": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=completion, timeout=TIMEOUT) as r:
        events = _sse(r)
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "text_completion" for e in events[:-1])


def test_a_client_that_hangs_up_aborts_its_request_on_the_replica(base_url):
    body = {
        "model": "ad0",
        "messages": [{"role": "user", "content": "a long one"}],
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST", base_url + "/v1/chat/completions", json=body, timeout=TIMEOUT
    ) as reply:
        replica = reply.headers[REPLICA_HEADER]
        aborted = _stats(base_url)[replica]["finished"].get("abort", 0)
        next(line for line in reply.iter_lines() if line.startswith("data: "))
    # Closing the response closed the connection: proxy -> ingress -> replica -> engine abort.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = _stats(base_url)[replica]
        if stats["finished"].get("abort", 0) > aborted:
            break
        time.sleep(0.2)
    assert stats["finished"].get("abort", 0) == aborted + 1
    assert stats["open_requests"] == 0


def test_a_dead_replica_fails_over_without_losing_other_requests(base_url):
    stats = _stats(base_url)
    holder = next(name for name, s in stats.items() if "ad0" in s["resident_loads"])
    survivor = next(name for name, s in stats.items() if "ad1" in s["resident_loads"])
    assert holder != survivor
    opened = threading.Barrier(6 + 1 + 1)

    def stream_one(model: str = "ad1") -> tuple[str, list[str], float]:
        """(replica, events, when [DONE] arrived), holding the stream open until the kill."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 200 if model == "ad1" else 400,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream(
            "POST", base_url + "/v1/chat/completions", json=body, timeout=TIMEOUT
        ) as reply:
            assert reply.status_code == 200
            lines = reply.iter_lines()
            events = [next(line[6:] for line in lines if line.startswith("data: "))]
            opened.wait(timeout=60)
            events += [line[6:] for line in lines if line.startswith("data: ")]
            return reply.headers[REPLICA_HEADER], events, time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        streams = [pool.submit(stream_one) for _ in range(6)]
        # Streaming on the replica about to die, its first chunk already sent: cut short.
        cut = pool.submit(stream_one, "ad0")
        plain = [pool.submit(_chat, base_url, "ad1", max_tokens=100, ignore_eos=True)]
        # In flight on the replica about to die, with no byte sent yet: retried elsewhere.
        doomed = [pool.submit(_chat, base_url, "ad0", max_tokens=300, ignore_eos=True)]
        opened.wait(timeout=60)
        killed_at = time.monotonic()
        ray.kill(_actor(holder), no_restart=True)
        results = [f.result(timeout=120) for f in streams]
        cut_replica, cut_events, _ = cut.result(timeout=120)
        plain_reply, doomed_reply = plain[0].result(timeout=120), doomed[0].result(timeout=120)
    for replica, events, done_at in results:
        assert replica == survivor
        assert events[-1] == "[DONE]" and done_at > killed_at
        finals = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
        assert finals[-1] == "length" and "error" not in "".join(events)
    assert _replica_of(plain_reply) == survivor
    # The stream whose replica died ends with an OpenAI error event, then [DONE].
    assert cut_replica == holder and cut_events[-1] == "[DONE]"
    error = json.loads(cut_events[-2])["error"]
    assert error["type"] == "service_unavailable" and "lost" in error["message"]
    assert plain_reply.json()["usage"]["completion_tokens"] == 100
    # The request that was running on the killed replica was re-run on a live one.
    assert doomed_reply.status_code == 200, doomed_reply.text
    assert doomed_reply.headers[REPLICA_HEADER] != holder
    assert doomed_reply.json()["usage"]["completion_tokens"] == 300

    # The killed replica's adapter is served again (the ingress retries on a live replica).
    attempts, reply = 0, None
    while attempts < 5:
        attempts += 1
        reply = _chat(base_url, "ad0")
        if reply.status_code == 200:
            break
        time.sleep(1.0)
    assert reply is not None and reply.status_code == 200, reply.text
    assert attempts == 1  # transparent: no client-side retry was needed
    assert reply.headers[REPLICA_HEADER] != holder
