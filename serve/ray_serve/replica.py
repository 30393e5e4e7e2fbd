"""The replica deployment: one engine per replica, adapters made resident through Ray multiplexing.

A replica builds exactly what `mixserve serve` builds (`build_server`: engine, metrics, the
FastAPI app) and answers forwarded HTTP requests by running them through that app in-process
(`asgi.forward_response`). Before that, the request's `multiplexed_model_id` (the adapter name,
set by the ingress) goes through a `@serve.multiplexed` loader: it registers the adapter's folder
under the configured roots and starts its background load. Ray records which adapter ids each
replica holds and routes later requests with the same id to those replicas; that is the affinity.

Memory stays the pager's business: its host cache and device slots evict by LRU on their own.
`max_adapters` bounds only the ids a replica advertises to Ray's router; an id Ray drops is not
unloaded here (requests may still be using it), it merely stops attracting traffic.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from mixserve.adapters import AdapterError
from mixserve.api.errors import APIError
from mixserve.config import EngineConfig, ServerConfig
from mixserve.engine import EngineDeadError
from mixserve.ray_serve.asgi import ForwardedRequest, ResponseHead, forward_response
from mixserve.server import build_server

logger = logging.getLogger(__name__)


class NotAnAdapterError(LookupError):
    """The id names no adapter this replica can serve (the app then answers 404)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ResidentAdapter:
    """What the multiplexed loader returns: Ray only needs an object per resident id."""

    name: str
    path: str | None


@serve.deployment(name="MixserveReplica", ray_actor_options={"num_cpus": 1})
class MixserveReplica:
    def __init__(
        self,
        engine_config: EngineConfig,
        server_config: ServerConfig,
        max_adapters: int = 16,
        torch_threads: int | None = None,
    ) -> None:
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)  # replicas sharing a node share its cores
        self._server = build_server(engine_config, server_config)
        self._state = self._server.state
        # The actor's name identifies the replica (ray.get_actor finds it in Serve's namespace).
        self._actor_name = ray.get_runtime_context().get_actor_name() or f"pid-{os.getpid()}"
        self._resident_loads: collections.Counter[str] = collections.Counter()
        self._requests: collections.Counter[str] = collections.Counter()
        self._closed = False

        async def load(adapter: str) -> ResidentAdapter:
            return await self._make_resident(adapter)

        # Wrapped per instance so max_adapters can be configured (Ray detects multiplexed
        # functions stored on the instance); a bound method cannot carry Ray's cache attribute.
        self._load_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(load)
        logger.info(
            "replica %s serving %s (up to %d resident adapter ids)",
            self._actor_name,
            self._state.model_name,
            max_adapters,
        )

    async def _make_resident(self, adapter: str) -> ResidentAdapter:
        path = self._state.roots.resolve(adapter)  # None: maybe registered at start-up (demo-*)

        def register(core: Any) -> None:
            pager = core.pager
            if pager is None:
                raise NotAnAdapterError(adapter)
            if not pager.has_source(adapter):
                if path is None:
                    raise NotAnAdapterError(adapter)
                pager.add_source(adapter, path)
            pager.acquire(adapter)  # starts the background load now...
            pager.release(adapter)  # ...without holding it (the pager's LRU may evict it)

        await self._state.client.call(register)
        self._resident_loads[adapter] += 1
        logger.info("replica %s: adapter '%s' made resident", self._actor_name, adapter)
        return ResidentAdapter(adapter, path)

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[ResponseHead | bytes]:
        """Serve one forwarded HTTP request: a ResponseHead, then body chunks (SSE included)."""
        adapter = serve.get_multiplexed_model_id()
        self._requests[adapter] += 1
        if adapter:
            try:
                await self._load_adapter(adapter)
            except (NotAnAdapterError, APIError, AdapterError, ValueError, EngineDeadError) as exc:
                # Not fatal here: the app resolves the name again and answers in OpenAI's
                # format (404 unknown model, 400 bad name or files, 503 engine down).
                logger.info("replica %s: '%s' not resident: %s", self._actor_name, adapter, exc)
        async for item in forward_response(self._server.app, request, self._actor_name):
            yield item

    async def info(self) -> dict[str, Any]:
        """What the ingress needs to know once: the base model's id (no adapter affinity)."""
        return {"model_name": self._state.model_name, "replica": self._actor_name}

    async def replica_stats(self) -> dict[str, Any]:
        """This replica's identity and counters, for operators and tests.

        `resident_loads`: times the multiplexed loader made each adapter resident here;
        `requests`: forwarded requests per multiplexed id ('' = none, e.g. the base model);
        `pager`: the engine's PagerStats (`disk_loads` counts loads from disk); `finished`:
        finished requests per finish reason.
        """

        def read(core: Any) -> tuple[dict[str, Any] | None, dict[str, str]]:
            pager = core.pager
            if pager is None:
                return None, {}
            residency = {name: pager.state(name).value for name in pager.sources()}
            return dataclasses.asdict(pager.stats()), residency

        pager_stats, residency = await self._state.client.call(read)
        return {
            "replica": self._actor_name,
            "pid": os.getpid(),
            "healthy": self._state.client.healthy,
            "resident_loads": dict(self._resident_loads),
            "requests": dict(self._requests),
            "residency": residency,
            "pager": pager_stats,
            "open_requests": self._state.client.num_open_requests,
            "finished": self._finished_by_reason(),
        }

    def _finished_by_reason(self) -> dict[str, int]:
        """Finished requests per finish reason (stop, length, abort, error): the replica's
        `mixserve:request_success_total`, which the ingress does not expose per replica."""
        return {
            sample.labels["finish_reason"]: int(sample.value)
            for metric in self._state.metrics.requests.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        }

    def check_health(self) -> None:
        """Ray calls this periodically; raising makes Ray replace the replica."""
        if not self._state.client.healthy:
            raise RuntimeError("the engine loop is not running")

    def __del__(self) -> None:
        # Ray has already waited for running requests (graceful_shutdown_timeout_s).
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._state.draining = True
        self._server.client.shutdown(drain=False, timeout=5.0)
