"""Run one HTTP request through an in-process ASGI app and stream its messages back.

Each Ray replica runs the ordinary mixserve FastAPI app (`create_app`) without a socket: the
ingress ships the request over as plain data, the replica drives the app with it, and the
response start and body chunks travel back through a Ray streaming call. So validation, chat
templates, errors, SSE and client-disconnect aborts are the same code as `mixserve serve`.
No ray import here: this is plain ASGI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.types import ASGIApp, Message

logger = logging.getLogger(__name__)

# Hop-by-hop or framing headers: the ingress's own server frames the relayed body.
_DROPPED_RESPONSE_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


@dataclass(frozen=True, slots=True)
class ForwardedRequest:
    """An HTTP request as plain, picklable data."""

    method: str
    path: str
    query_string: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    client: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """The first item of a forwarded response; body chunks (bytes) follow."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    replica: str = ""  # which replica answered (for operators and tests)

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)


def _scope(request: ForwardedRequest) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method.upper(),
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode("latin-1"),
        "query_string": request.query_string,
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
        "client": request.client,
        "server": ("mixserve-replica", 0),
        "state": {},
    }


async def run_asgi(app: ASGIApp, request: ForwardedRequest) -> AsyncIterator[Message]:
    """Yield the app's `http.response.*` messages for one request.

    Closing the iterator early (the caller's client went away) tells the app the client
    disconnected and then cancels it, so its streams run their cleanup (engine aborts).
    """
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    disconnected = asyncio.Event()
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()  # after the body, only a disconnect can arrive
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(_scope(request), receive, send)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    started = False
    held: list[Message | None] = []  # one message taken from the queue but not yet yielded

    async def next_message() -> Message | None:
        message = held.pop() if held else await sent.get()
        if message is None or message["type"] != "http.response.body":
            return message
        # Body chunks the app produced while the previous one was in transit go out as one:
        # a Ray stream item costs far more than the bytes in it, so a slow consumer catches up.
        parts = [message.get("body", b"")]
        while not sent.empty():
            following = sent.get_nowait()
            if following is None or following["type"] != "http.response.body":
                held.append(following)
                break
            parts.append(following.get("body", b""))
            message = following
        return {**message, "body": b"".join(parts)}

    try:
        while (message := await next_message()) is not None:
            started = started or message["type"] == "http.response.start"
            yield message
        try:
            await task
        except Exception:
            if not started:
                raise
            # The app already answered (Starlette sent its 500); report, do not mask the reply.
            logger.exception("the app failed after starting its response")
    finally:
        if not task.done():
            disconnected.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def forward_response(
    app: ASGIApp, request: ForwardedRequest, replica: str
) -> AsyncIterator[ResponseHead | bytes]:
    """The app's answer as a ResponseHead followed by non-empty body chunks."""
    async for message in run_asgi(app, request):
        if message["type"] == "http.response.start":
            headers = tuple(
                (k.decode("latin-1").lower(), v.decode("latin-1"))
                for k, v in message.get("headers", ())
            )
            yield ResponseHead(
                int(message["status"]),
                tuple(h for h in headers if h[0] not in _DROPPED_RESPONSE_HEADERS),
                replica,
            )
        elif message["type"] == "http.response.body" and message.get("body"):
            yield bytes(message["body"])
