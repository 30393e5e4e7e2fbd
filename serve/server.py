"""`mixserve serve`: engine + metrics + OpenAI app behind uvicorn, with SIGTERM draining."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import uvicorn
from sse_starlette.sse import AppStatus

from mixserve.adapters.synthetic import demo_adapter_dirs
from mixserve.api.adapter_roots import AdapterRoots
from mixserve.api.app import create_app
from mixserve.api.serving import ServerState
from mixserve.config import EngineConfig, ServerConfig
from mixserve.engine import EngineClient
from mixserve.engine.builder import build_engine
from mixserve.gc_freeze import freeze_startup_objects
from mixserve.metrics import Metrics
from mixserve.model import load_arch
from mixserve.model.default_model import DEFAULT_MODEL_NAME, cache_root, resolve_model_dir

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Server:
    state: ServerState
    app: object  # the FastAPI app
    client: EngineClient


def build_server(engine_config: EngineConfig, server_config: ServerConfig) -> Server:
    roots = AdapterRoots(server_config.adapter_dirs)
    adapters: dict[str, str] = {}
    if server_config.demo_adapters:
        arch = load_arch(resolve_model_dir(engine_config.model.model))
        adapters.update(demo_adapter_dirs(cache_root(), arch))
    built = build_engine(engine_config, adapters)
    built.core.runner.count_experts = server_config.expert_metrics
    metrics = Metrics(
        expert_metrics=server_config.expert_metrics,
        max_expert_adapters=server_config.max_expert_metric_adapters,
    )
    client = EngineClient(built.core, on_step=metrics.on_step).start()
    name = server_config.served_model_name or (
        DEFAULT_MODEL_NAME
        if engine_config.model.model in (None, "default")
        else os.path.basename(os.path.normpath(built.model_dir))
    )
    state = ServerState(
        client=client,
        tokenizer=built.tokenizer,
        config=server_config,
        metrics=metrics,
        roots=roots,
        model_name=name,
        max_model_len=built.max_model_len,
    )
    return Server(state, create_app(state), client)


class _DrainingServer(uvicorn.Server):
    """Marks the app as draining the moment a signal arrives: new requests get 503 while the
    running ones finish (uvicorn waits up to timeout_graceful_shutdown for them)."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._mixserve_state = state

    def handle_exit(self, sig: int, frame: object) -> None:
        self._mixserve_state.draining = True
        super().handle_exit(sig, frame)  # type: ignore[arg-type]
        if sig == signal.SIGTERM:
            # uvicorn re-raises captured signals after shutting down, which would kill the
            # process before the engine drains; SIGTERM is an orderly stop here: exit 0.
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def run_server(
    engine_config: EngineConfig, server_config: ServerConfig, log_level: str = "info"
) -> None:
    # sse-starlette would end every open stream at SIGTERM; we drain instead (streams end when
    # their generation does, and uvicorn's timeout_graceful_shutdown bounds the wait).
    AppStatus.disable_automatic_graceful_drain()
    server = build_server(engine_config, server_config)
    freeze_startup_objects()  # this process keeps its model and engine until it exits
    config = uvicorn.Config(
        server.app,  # type: ignore[arg-type]
        host=server_config.host,
        port=server_config.port,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=int(server_config.drain_timeout_s) or None,
        access_log=False,
    )
    logger.info(
        "serving %s on http://%s:%d",
        server.state.model_name,
        server_config.host,
        server_config.port,
    )
    try:
        _DrainingServer(config, server.state).run()
    finally:
        server.state.draining = True
        stopped = server.client.shutdown(drain=True, timeout=server_config.drain_timeout_s)
        if not stopped:
            logger.warning("engine did not drain within %.0f s", server_config.drain_timeout_s)
