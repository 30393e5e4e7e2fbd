"""Prometheus series: names and types, and the opt-in per-expert routing counts."""

from __future__ import annotations

import httpx
import pytest
from server_support import metric, tiny_server

from mixserve.metrics import Metrics


@pytest.fixture(scope="module")
def server(api_files):
    proc = tiny_server(api_files, "--expert-metrics", "--served-model-name", "tiny")
    yield proc
    assert proc.stop() == 0, proc.log()


def test_series_and_expert_counts(server):
    body = {"model": "ad0", "prompt": "route me", "max_tokens": 5, "temperature": 0}
    assert httpx.post(server.base_url + "/v1/completions", json=body).status_code == 200
    text = httpx.get(server.base_url + "/metrics").text
    for name in (
        "mixserve:time_to_first_token_seconds",
        "mixserve:inter_token_latency_seconds",
        "mixserve:e2e_request_latency_seconds",
        "mixserve:request_queue_time_seconds",
        "mixserve:adapter_load_seconds",
    ):
        assert f"# TYPE {name} histogram" in text
    assert metric(text, "mixserve:request_success_total", finish_reason="length") == 1
    assert metric(text, "mixserve:prompt_tokens_total") > 0
    assert metric(text, "mixserve:adapter_loads_total", result="ok") == 1
    # ad0 is a MixLoRA with 4 experts, top-2: 2 decisions per token per layer (2 layers).
    routed = [
        metric(text, "mixserve:adapter_expert_routed_total", adapter="ad0", expert=str(e))
        for e in range(4)
    ]
    assert sum(routed) > 0 and sum(routed) % 4 == 0


def test_expert_labels_are_bounded():
    metrics = Metrics(expert_metrics=True, max_expert_adapters=2)
    assert [metrics._expert_label(n) for n in ("a", "b", "c", "a", "d")] == [
        "a",
        "b",
        "other",
        "a",
        "other",
    ]


def test_expert_series_absent_unless_enabled(api_files):
    proc = tiny_server(api_files)
    try:
        body = {"model": "ad0", "prompt": "x", "max_tokens": 2}
        assert httpx.post(proc.base_url + "/v1/completions", json=body).status_code == 200
        text = httpx.get(proc.base_url + "/metrics").text
        assert "mixserve:adapter_expert_routed_total{" not in text
    finally:
        proc.stop()
