"""The FastAPI app: OpenAI routes, adapter management, health, metrics, auth and limits."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import mixserve
from mixserve.api.errors import APIError, error_body, install_handlers, model_not_found
from mixserve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
)
from mixserve.api.serving import ServerState
from mixserve.api.serving_chat import chat_completion
from mixserve.api.serving_completions import completion
from mixserve.config import ServerConfig


def invalid_api_key_body() -> dict:
    return error_body("missing or invalid API key", "authentication_error", None, "invalid_api_key")


def api_key_ok(config: ServerConfig, path: str, headers: Mapping[str, str]) -> bool:
    """False when an API key is configured, the route is under /v1 and the request does not
    carry it as 'Authorization: Bearer KEY' (headers: lower-case names)."""
    if not config.api_key or not path.startswith("/v1"):
        return True
    given = headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    return secrets.compare_digest(token.encode(), config.api_key.encode())


class _Limits:
    """Pure ASGI: API key on /v1 routes, request body size (also for chunked bodies)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state  # added with app.add_middleware: runs outermost-but-one

    async def _reject(self, send: Send, status: int, body: dict) -> None:
        await JSONResponse(body, status_code=status)({"type": "http"}, _no_receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        config = self.state.config
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if not api_key_ok(config, scope["path"], headers):
            await self._reject(send, 401, invalid_api_key_body())
            return
        limit = config.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._reject(send, 413, _too_large(limit))
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(send, 413, _too_large(limit))


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> dict:
    return error_body(
        f"request body exceeds {limit} bytes", "invalid_request_error", None, "request_too_large"
    )


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _residency(state: str) -> str:
    return {"not_loaded": "disk", "loading": "loading", "host": "host", "slot": "device"}.get(
        state, state
    )


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="mixserve", version=mixserve.__version__)
    install_handlers(app)
    app.state.mixserve = state

    @app.get("/health")
    async def health() -> Response:
        if state.draining or state.client.draining or not state.client.healthy:
            return JSONResponse(
                {"status": "unhealthy" if not state.client.healthy else "draining"}, status_code=503
            )
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict:
        return {"version": mixserve.__version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat_completion(state, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await completion(state, body, request)

    async def adapter_table() -> list[dict[str, Any]]:
        discovered = state.roots.discover()

        def read(core: Any) -> list[dict[str, Any]]:
            pager = core.pager
            sources = dict(pager.sources()) if pager is not None else {}
            rows = []
            for name in sorted(set(sources) | set(discovered)):
                registered = name in sources
                rows.append(
                    {
                        "name": name,
                        "path": sources.get(name, discovered.get(name)),
                        "residency": _residency(pager.state(name).value) if registered else "disk",
                        "in_flight": pager.in_flight(name) if registered else 0,
                    }
                )
            return rows

        return await state.client.call(read)

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(time.time())
        data = [
            {
                "id": state.model_name,
                "object": "model",
                "created": created,
                "owned_by": "mixserve",
                "root": state.model_name,
                "parent": None,
                "residency": "device",
            }
        ]
        for row in await adapter_table():
            data.append(
                {
                    "id": row["name"],
                    "object": "model",
                    "created": created,
                    "owned_by": "mixserve",
                    "root": row["path"],
                    "parent": state.model_name,
                    "residency": row["residency"],
                }
            )
        return {"object": "list", "data": data}

    @app.get("/v1/adapters")
    async def adapters() -> dict:
        return {"object": "list", "data": await adapter_table()}

    def require_loading() -> None:
        if not state.config.enable_adapter_loading:
            raise APIError(
                403,
                "adapter loading is disabled (start with --enable-adapter-loading)",
                type="permission_error",
                code="adapter_loading_disabled",
            )

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest) -> Response:
        require_loading()
        state.roots.check_name(body.lora_name)
        if body.lora_name == state.model_name:
            raise APIError(400, "an adapter cannot take the base model's name", param="lora_name")
        path = (
            state.roots.check_path(body.lora_path)
            if body.lora_path
            else state.roots.resolve(body.lora_name)
        )
        if path is None:
            raise model_not_found(body.lora_name)

        def register(core: Any) -> None:
            if (
                core.pager.has_source(body.lora_name)
                and core.pager.sources()[body.lora_name] != path
            ):
                raise APIError(
                    400,
                    f"adapter '{body.lora_name}' is already loaded from "
                    "another path; unload it first",
                    param="lora_name",
                )
            core.pager.add_source(body.lora_name, path)
            core.pager.acquire(body.lora_name)  # starts the load now (prefetch)...
            core.pager.release(body.lora_name)  # ...without holding it

        await state.client.call(register)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest) -> Response:
        require_loading()

        def unload(core: Any) -> bool:
            if not core.pager.has_source(body.lora_name):
                raise model_not_found(body.lora_name)
            return core.pager.request_unload(body.lora_name)

        done = await state.client.call(unload)
        suffix = "" if done else " (after its running requests finish)"
        return PlainTextResponse(
            f"Success: LoRA adapter '{body.lora_name}' removed successfully{suffix}."
        )

    app.add_middleware(_Limits, state=state)
    return app
