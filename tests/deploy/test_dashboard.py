"""The Grafana dashboard parses, covers the issue's panels, and queries only series that a live
server exports (a renamed metric would otherwise leave an empty panel and no error)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_support import ServerProcess

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/grafana/dashboards/mixserve.json"
METRIC = re.compile(r"mixserve:[a-zA-Z_][a-zA-Z0-9_:]*")
# Labels Prometheus adds at scrape time; the server's /metrics does not carry them.
SCRAPE_LABELS = {"instance", "job"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def queries() -> list[str]:
    """Every PromQL text: panel targets and the template variables' queries."""
    out = [t["expr"] for p in panels() for t in p["targets"]]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


def test_dashboard_is_well_formed():
    board = dashboard()
    assert board["uid"] == "mixserve" and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    for panel in panels():
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}" and "datasource" in variables
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_dashboard_has_the_panels_the_issue_asks_for():
    used = {m for q in queries() for m in METRIC.findall(q)}
    wanted = {
        "mixserve:request_success_total",  # request rate
        "mixserve:time_to_first_token_seconds_bucket",
        "mixserve:inter_token_latency_seconds_bucket",
        "mixserve:generation_tokens_total",  # throughput
        "mixserve:num_requests_waiting",  # queue
        "mixserve:kv_cache_usage_perc",
        "mixserve:prefix_cache_hits_total",
        "mixserve:prefix_cache_queries_total",
        "mixserve:adapters_resident",  # residency per tier
        "mixserve:adapter_loads_total",
        "mixserve:adapter_load_seconds_bucket",
        "mixserve:adapter_evictions_total",
        "mixserve:adapter_slots_used",
    }
    assert wanted <= used, sorted(wanted - used)


def test_percentiles_are_quantiles_of_bucket_rates():
    for query in queries():
        if "histogram_quantile" not in query:
            continue
        assert re.search(r"rate\(mixserve:\w+_bucket\{", query), query
        assert re.search(r"by \(le\)", query), query


@pytest.fixture(scope="module")
def live_metrics(deploy_model_files) -> dict[str, set[str]]:
    """sample name -> label names, from /metrics of a server that has served through adapters."""
    server = ServerProcess(
        [
            "--model",
            deploy_model_files["model"],
            "--adapter-dir",
            deploy_model_files["adapters"],
            "--no-demo-adapters",
            "--kv-cache-memory",
            "32MiB",
            "--served-model-name",
            "tiny",
        ]
    )
    try:
        # A routed adapter, a plain LoRA and the base model, so load, residency and hit series
        # all have samples; the repeated prompt exercises the prefix cache.
        for model in ("moe", "lora", "tiny", "moe"):
            body = {"model": model, "prompt": "the same prompt again", "max_tokens": 4}
            reply = httpx.post(server.base_url + "/v1/completions", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
        text = httpx.get(server.base_url + "/metrics").text
    finally:
        assert server.stop() == 0, server.log()
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def test_every_queried_metric_exists_on_a_live_server(live_metrics):
    for query in queries():
        names = METRIC.findall(query)
        assert names, f"no mixserve metric in {query!r}"
        for name in names:
            assert name in live_metrics, f"{name} (in {query!r}) is not on /metrics"
        # Grouping labels must exist on the series grouped, or the panel shows one blank series.
        labels = set().union(*(live_metrics[n] for n in names)) | SCRAPE_LABELS
        for group in re.findall(r"by \(([^)]*)\)", query):
            for label in filter(None, (g.strip() for g in group.split(","))):
                assert label in labels, f"{label!r} is not a label of {names} ({query!r})"


def test_legends_name_existing_labels(live_metrics):
    for panel in panels():
        for target in panel["targets"]:
            names = METRIC.findall(target["expr"])
            labels = set().union(*(live_metrics[n] for n in names)) | SCRAPE_LABELS
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert label in labels, f"{panel['title']}: legend label {label!r}"
