"""The ingress deployment: the OpenAI routes, each forwarded to a replica with adapter affinity.

It parses no more of a request than the `model` field: an adapter name becomes the call's
`multiplexed_model_id`, so Ray's router prefers replicas that already hold that adapter (then
those holding the fewest); base-model and listing requests go to any replica. The replica runs
the request through the ordinary mixserve app and streams the response back, SSE included.

A replica that dies before it answered is retried on another (Ray drops it from routing); one
that dies mid-stream ends the stream with an OpenAI error event. Auth and the body limit are
checked here too, so unauthenticated requests cannot make replicas load adapters.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import ray.exceptions
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

import mixserve
from mixserve.api.adapter_roots import AdapterRoots
from mixserve.api.app import api_key_ok, invalid_api_key_body
from mixserve.api.errors import APIError, error_body, error_response, install_handlers
from mixserve.config import ServerConfig
from mixserve.ray_serve.asgi import ForwardedRequest, ResponseHead

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-mixserve-replica"

# The replica went away (killed, crashed, being replaced) before or while answering.
_REPLICA_GONE: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError,  # includes ActorDiedError and ActorUnavailableError
    ray.exceptions.WorkerCrashedError,
    *(
        error
        for name in ("ReplicaUnavailableError", "BackPressureError")
        if (error := getattr(serve.exceptions, name, None)) is not None
    ),
)

app = FastAPI(title="mixserve (Ray Serve)", version=mixserve.__version__)
install_handlers(app)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The whole body, or None once it exceeds limit (also for chunked bodies)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _adapter_of(body: bytes, model_name: str) -> str | None:
    """The adapter a completion body asks for, or None (base model, or a body the replica's app
    will reject: it answers with the proper OpenAI error)."""
    try:
        model = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    if not isinstance(model, str) or model in (model_name, "default"):
        return None
    try:
        AdapterRoots.check_name(model)
    except APIError:
        return None
    return model


def _sse_error(message: str) -> bytes:
    body = error_body(message, "service_unavailable", None, "service_unavailable")
    return f"data: {json.dumps(body)}\r\n\r\ndata: [DONE]\r\n\r\n".encode()


# Routes are module-level functions, not methods: Ray pickles the app, and methods of the
# decorated class would travel by value without the names their annotations refer to. They
# come before the class: serve.ingress(app) takes a copy of the app as it is then.
def _ingress() -> Any:
    """The MixserveIngress instance of this replica."""
    return serve.get_replica_context().servable_object


@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _ingress().forward(request, affinity=True)


@app.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _ingress().forward(request, affinity=True)


@app.get("/v1/models")
async def models(request: Request) -> Response:
    # The base model and every adapter under the roots; residency is that of whichever
    # replica answered.
    return await _ingress().forward(request, affinity=False)


@app.get("/health")
async def health(request: Request) -> Response:
    return await _ingress().forward(request, affinity=False)


@app.get("/version")
async def version() -> dict:
    return {"version": mixserve.__version__}


@app.get("/v1/replicas")
async def replicas(request: Request, expected: int = 0) -> Response:
    """Per-replica stats (MixserveReplica.replica_stats); `expected`: stop polling once that
    many distinct replicas answered."""
    return await _ingress().replicas(request, expected)


@serve.deployment(name="MixserveIngress", ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class MixserveIngress:
    def __init__(
        self,
        replicas: DeploymentHandle,
        server_config: ServerConfig,
        max_attempts: int = 3,
        retry_backoff_s: float = 0.5,
    ) -> None:
        self._replicas = replicas
        self._config = server_config
        self._max_attempts = max(1, max_attempts)
        self._backoff_s = retry_backoff_s
        self._model_name: str | None = None

    async def replicas(self, request: Request, expected: int) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        if not api_key_ok(self._config, request.url.path, headers):
            return JSONResponse(invalid_api_key_body(), status_code=401)
        stats = await collect_replica_stats(self._replicas, expected=expected)
        return JSONResponse({"object": "list", "data": stats})

    async def _base_model_name(self) -> str:
        if self._model_name is None:
            try:
                info = await self._replicas.info.remote()
            except _REPLICA_GONE as exc:
                raise APIError(
                    503, f"no replica answered: {exc}", type="service_unavailable"
                ) from exc
            self._model_name = str(info["model_name"])
        return self._model_name

    async def _open(
        self, request: ForwardedRequest, adapter: str | None
    ) -> tuple[DeploymentResponseGenerator, ResponseHead]:
        """Start the call on a replica and wait for its response head, retrying on another
        replica while the chosen one dies before answering (nothing was sent yet)."""
        options: dict[str, Any] = {"stream": True}
        if adapter is not None:
            options["multiplexed_model_id"] = adapter
        handle = self._replicas.options(**options)
        for attempt in range(1, self._max_attempts + 1):
            stream: DeploymentResponseGenerator = handle.forward.remote(request)
            try:
                head = await stream.__anext__()
            except asyncio.CancelledError:
                stream.cancel()  # the client left before the answer began
                raise
            except _REPLICA_GONE as exc:
                stream.cancel()
                if attempt == self._max_attempts:
                    raise APIError(
                        503,
                        f"no replica could serve the request: {exc}",
                        type="service_unavailable",
                        code="service_unavailable",
                    ) from exc
                logger.warning("replica lost before answering (%s); retrying", type(exc).__name__)
                await asyncio.sleep(self._backoff_s * attempt)
                continue
            except StopAsyncIteration as exc:
                raise APIError(502, "the replica sent no response", type="internal_error") from exc
            assert isinstance(head, ResponseHead)
            return stream, head
        raise AssertionError("unreachable")

    async def _relay(
        self, stream: DeploymentResponseGenerator, head: ResponseHead
    ) -> AsyncIterator[bytes]:
        ended = False
        try:
            async for chunk in stream:
                yield chunk
            ended = True
        except _REPLICA_GONE as exc:
            ended = True
            logger.warning("replica %s lost mid-response: %s", head.replica, type(exc).__name__)
            if (head.header("content-type") or "").startswith("text/event-stream"):
                yield _sse_error(f"the replica serving this stream was lost: {exc}")
        finally:
            if not ended:
                stream.cancel()  # the client left: the replica aborts its engine requests

    async def forward(self, request: Request, *, affinity: bool) -> Response:
        config = self._config
        headers = {k.lower(): v for k, v in request.headers.items()}
        if not api_key_ok(config, request.url.path, headers):
            return JSONResponse(invalid_api_key_body(), status_code=401)
        body = await _read_body(request, config.max_body_bytes)
        if body is None:
            return error_response(
                413,
                f"request body exceeds {config.max_body_bytes} bytes",
                "invalid_request_error",
                None,
                "request_too_large",
            )
        adapter = _adapter_of(body, await self._base_model_name()) if affinity else None
        client = (request.client.host, request.client.port) if request.client else None
        forwarded = ForwardedRequest(
            request.method,
            request.url.path,
            request.url.query.encode("latin-1"),
            tuple(request.headers.items()),
            body,
            client,
        )
        stream, head = await self._open(forwarded, adapter)
        response = StreamingResponse(self._relay(stream, head), status_code=head.status)
        response.raw_headers = [
            (k.encode("latin-1"), v.encode("latin-1")) for k, v in head.headers
        ] + [(REPLICA_HEADER.encode(), head.replica.encode("latin-1"))]
        return response


async def collect_replica_stats(
    replicas: DeploymentHandle, *, expected: int = 0, attempts: int = 32
) -> list[dict[str, Any]]:
    """Stats of the replicas reached by up to `attempts` calls (Ray routes each to some replica;
    it has no broadcast), stopping once `expected` distinct replicas answered."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(attempts):
        try:
            stats = await replicas.replica_stats.remote()
        except _REPLICA_GONE:
            continue  # it is being replaced; the others still answer
        seen[stats["replica"]] = stats
        if expected and len(seen) >= expected:
            break
    return sorted(seen.values(), key=lambda s: s["replica"])
