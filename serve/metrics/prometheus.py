"""Prometheus series for mixserve (`mixserve:` prefix, `_seconds` histograms, `_total` counters).

Engine-side series are updated on the engine thread after each step from plain stats; request
series by the API when a request ends. Cumulative engine counters are turned into Prometheus
counters by adding the increase since the previous step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from mixserve.metrics.stats import RequestRecord

if TYPE_CHECKING:
    from mixserve.engine import EngineCore, StepReport

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_OTHER = "other"


class Metrics:
    def __init__(self, *, expert_metrics: bool = False, max_expert_adapters: int = 20) -> None:
        r = self.registry = CollectorRegistry()
        self.expert_metrics = expert_metrics
        self.max_expert_adapters = max_expert_adapters
        self._expert_adapters: set[str] = set()
        self.requests = Counter(
            "mixserve:request_success",
            "Finished requests by finish reason",
            ["finish_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "mixserve:time_to_first_token_seconds",
            "Time to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "mixserve:inter_token_latency_seconds",
            "Time between output tokens",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "mixserve:e2e_request_latency_seconds",
            "Request latency, end to end",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "mixserve:request_queue_time_seconds",
            "Time from arrival to first scheduling",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "mixserve:prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.generation_tokens = Counter(
            "mixserve:generation_tokens", "Generated tokens of finished requests", registry=r
        )
        self.running = Gauge("mixserve:num_requests_running", "Sequences running", registry=r)
        self.waiting = Gauge("mixserve:num_requests_waiting", "Sequences waiting", registry=r)
        self.kv_usage = Gauge(
            "mixserve:kv_cache_usage_perc", "Fraction of KV blocks in use", registry=r
        )
        self.prefix_queries = Counter(
            "mixserve:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            registry=r,
        )
        self.prefix_hits = Counter(
            "mixserve:prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=r
        )
        self.preemptions = Counter("mixserve:num_preemptions", "Sequences preempted", registry=r)
        self.adapter_loads = Counter(
            "mixserve:adapter_loads", "Adapter loads from disk", ["result"], registry=r
        )
        self.adapter_load_seconds = Histogram(
            "mixserve:adapter_load_seconds",
            "Disk to host: read and validate",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_evictions = Counter(
            "mixserve:adapter_evictions", "Adapters evicted", ["tier"], registry=r
        )
        self.adapter_hits = Counter(
            "mixserve:adapter_hits",
            "Where a step found its adapters (slot, host, or disk load)",
            ["tier"],
            registry=r,
        )
        self.adapters_resident = Gauge(
            "mixserve:adapters_resident", "Adapters held per tier", ["tier"], registry=r
        )
        self.slots_used = Gauge(
            "mixserve:adapter_slots_used", "Adapter slots holding an adapter", registry=r
        )
        self.slots_total = Gauge("mixserve:adapter_slots_total", "Adapter slots", registry=r)
        self.routed = Counter(
            "mixserve:adapter_expert_routed",
            "Routing decisions per expert, summed over layers (opt-in)",
            ["adapter", "expert"],
            registry=r,
        )
        self._last: dict[str, float] = {}

    # -- engine thread -------------------------------------------------------------------------

    def _increase(self, counter: Counter, key: str, value: float) -> None:
        delta = value - self._last.get(key, 0.0)
        if delta > 0:
            counter.inc(delta)
        self._last[key] = value

    def on_step(self, core: EngineCore, report: StepReport) -> None:
        stats = core.stats()
        sched = stats.scheduler
        self.running.set(sched.num_running)
        self.waiting.set(sched.num_waiting)
        self.kv_usage.set(sched.kv_usage)
        self._increase(self.prefix_queries, "pq", sched.prefix_queried_tokens)
        self._increase(self.prefix_hits, "ph", sched.prefix_hit_tokens)
        self._increase(self.preemptions, "pre", sched.num_preemptions)
        for seconds in report.queue_seconds:
            self.queue.observe(seconds)
        for _, seconds, ok in report.adapter_loads:
            self.adapter_loads.labels(result="ok" if ok else "error").inc()
            if ok:
                self.adapter_load_seconds.observe(seconds)
        pager = stats.pager
        if pager is not None:
            self._increase(self.adapter_evictions.labels(tier="host"), "eh", pager.host_evictions)
            self._increase(self.adapter_evictions.labels(tier="slot"), "es", pager.slot_evictions)
            self._increase(self.adapter_hits.labels(tier="slot"), "hs", pager.slot_hits)
            self._increase(self.adapter_hits.labels(tier="host"), "hh", pager.host_hits)
            self._increase(self.adapter_hits.labels(tier="disk"), "hd", pager.disk_loads)
            self.adapters_resident.labels(tier="host").set(pager.host_resident)
            self.adapters_resident.labels(tier="slot").set(pager.slots_in_use)
            self.slots_used.set(pager.slots_in_use)
            self.slots_total.set(pager.slots_total)
        if self.expert_metrics:
            for adapter, counts in report.expert_counts:
                label = self._expert_label(adapter)
                for expert, count in enumerate(counts):
                    if count:
                        self.routed.labels(adapter=label, expert=str(expert)).inc(count)

    def _expert_label(self, adapter: str) -> str:
        """At most max_expert_adapters adapter labels; later adapters share the label 'other'."""
        if adapter in self._expert_adapters:
            return adapter
        if len(self._expert_adapters) < self.max_expert_adapters:
            self._expert_adapters.add(adapter)
            return adapter
        return _OTHER

    # -- API side ------------------------------------------------------------------------------

    def on_request_finished(self, record: RequestRecord, finish_reason: str, end: float) -> None:
        self.requests.labels(finish_reason=finish_reason).inc()
        self.prompt_tokens.inc(record.prompt_tokens)
        self.generation_tokens.inc(record.generation_tokens)
        self.e2e.observe(end - record.start)
        if record.first_token is not None:
            self.ttft.observe(record.first_token - record.start)
        for gap in record.inter_token:
            self.itl.observe(gap)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
