"""EngineClient: the engine loop on its own thread, driven from asyncio code.

`add_request` returns an async iterator of TokenDelta; `abort` ends a request (from any thread).
Commands reach the loop through a thread-safe queue and are applied between steps, so the core
stays single-threaded. If the loop itself dies, every open stream gets an EngineDeadError and
`healthy` turns False; errors inside a step only fail that step's requests (EngineCore).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from mixserve.engine.core import EngineCore, EngineStats, StepReport
from mixserve.torch_threads import set_torch_threads
from mixserve.types import SamplingParams, TokenDelta

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine loop stopped; no request can be served."""


class EngineShuttingDownError(RuntimeError):
    """The engine is draining for shutdown and takes no new requests."""


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenDelta | BaseException]
    num_completions: int
    # Completions the engine thread has sent a final delta for. Only that thread touches it; the
    # consumer counts what it has *read* separately, so it never stops before the last delta.
    sent_final: set[int] = field(default_factory=set)

    def put(self, item: TokenDelta | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            pass


class EngineClient:
    def __init__(
        self,
        core: EngineCore,
        *,
        idle_wait_s: float = 0.05,
        on_step: Callable[[EngineCore, StepReport], None] | None = None,
    ) -> None:
        self._core = core
        self._on_step = on_step  # called on the engine thread after every step (metrics)
        self._idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}  # owned by the engine thread
        self._dead: BaseException | None = None
        self._draining = False
        self._stopped = threading.Event()
        self._stats: EngineStats = core.stats()
        # The steps run with the creating thread's torch thread count (see torch_threads).
        self._torch_threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name="mixserve-engine", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> EngineClient:
        self._thread.start()
        return self

    @property
    def healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    @property
    def draining(self) -> bool:
        return self._draining

    def shutdown(self, *, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop taking requests; with drain, finish the running ones first. True if stopped."""
        self._draining = True
        if not drain:
            self._commands.put(self._abort_all)
        self._stopped.set()
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def stats(self) -> EngineStats:
        """The last step's counters (read from any thread)."""
        return self._stats

    @property
    def num_open_requests(self) -> int:
        return len(self._streams)

    # -- requests ------------------------------------------------------------------------------

    async def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        adapter: str | None = None,
    ) -> AsyncIterator[TokenDelta]:
        """Submit a request. Validation errors (ValueError, AdapterError) are raised here."""
        if self._dead is not None or not self._thread.is_alive():
            raise EngineDeadError(f"the engine is not running ({self._dead!r})")
        if self._draining:
            raise EngineShuttingDownError("the engine is shutting down")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), sampling.n)
        accepted: asyncio.Future[None] = stream.loop.create_future()

        def add() -> None:
            try:
                self._core.add_request(request_id, list(prompt_token_ids), sampling, adapter)
            except Exception as exc:  # noqa: BLE001 - handed to the caller, who raises it
                stream.loop.call_soon_threadsafe(_settle, accepted, exc)
                return
            self._streams[request_id] = stream
            stream.loop.call_soon_threadsafe(_settle, accepted, None)

        self._commands.put(add)
        self._wakeup.set()
        await accepted
        return self._iterate(request_id, stream)

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[TokenDelta]:
        finished: set[int] = set()
        try:
            while len(finished) < stream.num_completions:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    finished.add(item.index)
                yield item
        finally:
            if len(finished) < stream.num_completions:
                self.abort(request_id)  # the consumer stopped early (e.g. client disconnected)

    async def call(self, fn: Callable[[EngineCore], T]) -> T:
        """Run fn(core) on the engine thread between steps (the only safe way to touch the core,
        e.g. to register or unload adapters) and return its result or raise its exception."""
        if self._dead is not None or not self._thread.is_alive():
            raise EngineDeadError(f"the engine is not running ({self._dead!r})")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            try:
                result = fn(self._core)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(_settle, done, exc)
                return
            loop.call_soon_threadsafe(_resolve, done, result)

        self._commands.put(run)
        self._wakeup.set()
        return await done

    def abort(self, request_id: str) -> None:
        """End a request and free its resources; safe from any thread, idempotent."""
        self._commands.put(lambda: self._dispatch(self._core.abort(request_id)))
        self._wakeup.set()

    # -- engine thread -------------------------------------------------------------------------

    def _dispatch(self, deltas: list[TokenDelta]) -> None:
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue
            stream.put(delta)
            if delta.finished:
                stream.sent_final.add(delta.index)
                if len(stream.sent_final) >= stream.num_completions:
                    del self._streams[delta.request_id]

    def _abort_all(self) -> None:
        for request_id in list(self._streams):
            self._dispatch(self._core.abort(request_id))

    def _drain_commands(self) -> int:
        count = 0
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return count
            command()
            count += 1

    def _run(self) -> None:
        try:
            set_torch_threads(self._torch_threads)
            while True:
                if self._drain_commands() and self._on_step is not None:
                    # Commands change state between steps (aborts free blocks): report it too.
                    self._on_step(self._core, StepReport(False, 0, (), (), ()))
                if self._core.has_work:
                    self._dispatch(self._core.step())
                    self._stats = self._core.stats()
                    if self._on_step is not None:
                        self._on_step(self._core, self._core.last_report)
                    if not self._core.last_step_ran:
                        self._core.wait_for_progress(self._idle_wait_s)
                    continue
                if self._stopped.is_set():
                    return
                self._wakeup.wait(self._idle_wait_s)
                self._wakeup.clear()
        except BaseException as exc:  # noqa: BLE001 - the loop must report any death
            logger.exception("engine loop died")
            self._dead = exc
            error = EngineDeadError(f"engine loop died: {exc!r}")
            for stream in list(self._streams.values()):
                stream.put(error)
            self._streams.clear()


def _resolve(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
