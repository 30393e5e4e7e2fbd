"""EngineCore: one synchronous step = schedule -> adapter slots -> forward -> update.

Single-threaded by contract: only the thread that owns the core (the engine loop, or the offline
LLM) calls it. Errors inside a step fail exactly the requests of that step; they never hang.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from mixserve.adapters import AdapterError
from mixserve.adapters.pager import AdapterPager
from mixserve.adapters.pager_state import PagerStats
from mixserve.runner import ModelRunner
from mixserve.scheduler import Scheduler, SchedulerStats
from mixserve.torch_threads import ComputeThreadBudget
from mixserve.types import SamplingParams, SchedulerOutput, TokenDelta

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StepReport:
    """What one step did, for metrics (plain data; metrics/ turns it into series)."""

    ran: bool  # False: nothing was schedulable (e.g. adapters still loading)
    num_scheduled_tokens: int
    queue_seconds: tuple[float, ...]  # requests first scheduled in this step
    adapter_loads: tuple[tuple[str, float, bool], ...]  # (name, seconds, ok) finished loads
    expert_counts: tuple[tuple[str, tuple[int, ...]], ...]  # (adapter, per-expert decisions)
    num_prompt_tokens: int = 0  # prompt positions the step computed (prefill chunks)
    num_sequences: int = 0
    num_adapters: int = 0  # distinct adapters of its sequences
    num_loads_running: int = 0  # adapter loads running as the step started
    seconds: float = 0.0  # slot copies and the forward (0 when nothing ran)


def _prompt_positions(plan: SchedulerOutput) -> int:
    """Prompt positions a plan computes (the rest of its tokens are decodes)."""
    total = 0
    for entry in plan.sequences:
        start, prompt_len = entry.num_computed_tokens, len(entry.prompt_token_ids)
        end = start + len(entry.token_ids)
        total += max(0, min(end, prompt_len) - min(start, prompt_len))
    return total


@dataclass(frozen=True, slots=True)
class EngineStats:
    scheduler: SchedulerStats
    pager: PagerStats | None
    num_steps: int
    num_prompt_tokens: int  # computed prompt tokens since start (prefix-cache hits excluded)
    num_generated_tokens: int  # sampled tokens since start


class EngineCore:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        pager: AdapterPager | None,
        cpu_threads: ComputeThreadBudget | None = None,
        *,
        hold_ahead_loads: bool = False,
    ) -> None:
        """cpu_threads: on a CPU device, steps share the CPUs with running adapter loads.
        hold_ahead_loads: a load starts only once its request is among those admitted next,
        or a step ran without prompt tokens (`_start_due_loads`); for CPU engines, where a
        load takes a CPU from the steps."""
        self.runner = runner
        self.scheduler = scheduler
        self.pager = pager
        self.cpu_threads = cpu_threads
        self.hold_ahead_loads = hold_ahead_loads
        self.num_steps = 0
        self.last_step_ran = False  # False: nothing was schedulable (e.g. adapters still loading)
        self.last_report = StepReport(False, 0, (), (), ())
        self._loads: list[tuple[str, float, bool]] = []
        self._expert_counts: list[tuple[str, tuple[int, ...]]] = []
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0

    # -- requests ------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        adapter: str | None = None,
    ) -> None:
        """Queue a request; raises ValueError (bad request) or AdapterError (unknown adapter)."""
        vocab = self.runner.model.arch.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        key = None
        if adapter is not None:
            if self.pager is None:
                raise AdapterError(adapter, "this engine serves no adapters")
            key = (adapter, self.pager.acquire(adapter, hold=self.hold_ahead_loads))
        try:
            self.scheduler.add_request(request_id, prompt_token_ids, sampling, adapter, key)
        except ValueError:
            if adapter is not None and self.pager is not None:
                self.pager.release(adapter)
            raise

    def abort(self, request_id: str) -> list[TokenDelta]:
        deltas = self.scheduler.abort(request_id)
        self._release_finished()
        return deltas

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_unfinished

    # -- stepping ------------------------------------------------------------------------------

    def _fail_load_errors(self) -> list[TokenDelta]:
        deltas: list[TokenDelta] = []
        if self.pager is None:
            return deltas
        for result in self.pager.poll():
            self._loads.append((result.name, result.seconds, result.error is None))
            if result.error is None:
                continue
            logger.warning("adapter '%s' failed to load: %s", result.name, result.error)
            for request_id in self.scheduler.request_ids_waiting_for(result.name):
                deltas += self.scheduler.fail(request_id, str(result.error))
        return deltas

    def _place_new_loads(self) -> None:
        """Adapters whose load just finished go into free slots now, ahead of their first step
        (usually the copy that step would make), and on CPU that frees their host copy
        (AdapterPager's exclusive tiers), whose pages the next load's file can then reuse. Only
        an optimisation: a failure is logged, and prepare places the adapters as before."""
        loaded = [name for name, _, ok in self._loads if ok]
        if not loaded or self.pager is None:
            return
        try:
            with self._cpus_beside_loads():
                self.pager.prefetch_slots(loaded, free_only=True)
        except Exception:  # noqa: BLE001 - e.g. out of device memory; the step still runs
            logger.exception("placing newly loaded adapters %s in free slots failed", loaded)

    def _start_due_loads(self) -> None:
        """Held loads start when a request can use them next: its sequence is among those the
        running cap admits next. All of them start once a step ran without prompt tokens, so a
        burst's later waves load beside the first wave's decode steps, not beside its prefill
        (a cold burst of 256 requests ran 4-9% faster so: bench/RESULTS.md, session 26)."""
        pager = self.pager
        if pager is None or not pager.num_loads_held:
            return
        pager.start_loads(self.scheduler.next_admission_adapters())
        if self.last_report.ran and self.last_report.num_prompt_tokens == 0:
            pager.start_loads()

    def _start_loads_if_stalled(self) -> None:
        """Nothing could be scheduled: if no started load is left to wait for either, start
        the held ones (the engine would otherwise wait on nothing; idle, it loses nothing)."""
        pager = self.pager
        if pager is not None and pager.num_loads_held and pager.num_loads_started == 0:
            pager.start_loads()

    def _execute(
        self,
        plan: SchedulerOutput,
        adapters: set[str],
        num_prompt_tokens: int,
    ) -> list[TokenDelta]:
        try:
            # The slot copies too: with every thread while a load worker holds a CPU, their
            # OpenMP team waits on its descheduled member, as a step's would.
            with self._cpus_beside_loads() as refresh:
                slots = self.pager.prepare(adapters) if adapters and self.pager is not None else {}
                output = self.runner.execute(plan, slots, between_layers=refresh)
        except Exception as exc:  # noqa: BLE001 - any failure of a step fails its requests only
            logger.exception("step failed; failing its %d sequences", len(plan.sequences))
            deltas: list[TokenDelta] = []
            request_ids = {self.scheduler.request_id_of(s.seq_id) for s in plan.sequences}
            for request_id in request_ids - {None}:
                deltas += self.scheduler.fail(request_id, f"internal error in a step: {exc!r}")
            return deltas
        finally:
            if self.pager is not None:
                self.pager.unpin_all()
        self.num_prompt_tokens += num_prompt_tokens
        deltas = self.scheduler.update(plan, output)
        self.num_generated_tokens += sum(len(tokens) for tokens in output.sampled.values())
        if output.expert_counts and self.pager is not None:
            names = self.pager.pool.names
            for slot, counts in output.expert_counts.items():
                if names[slot] is not None:
                    self._expert_counts.append((names[slot], counts))
        return deltas

    def _cpus_beside_loads(self) -> AbstractContextManager[Callable[[], int] | None]:
        """The step's torch threads follow the running loads (re-read between layers)."""
        pager = self.pager
        if self.cpu_threads is None or pager is None:
            return nullcontext()
        return self.cpu_threads.following(lambda: pager.num_loads_running)

    def step(self) -> list[TokenDelta]:
        """Run one step; returns every request's new output (finished ones included)."""
        deltas = self._fail_load_errors()
        self._place_new_loads()
        self._start_due_loads()
        ready = self.pager.is_ready if self.pager is not None else (lambda _: True)
        plan = self.scheduler.schedule(ready)
        self.last_step_ran = bool(plan.sequences)
        if not plan.sequences:
            self._start_loads_if_stalled()
        adapters = {s.adapter for s in plan.sequences if s.adapter is not None}
        num_prompt_tokens = _prompt_positions(plan)
        num_loads_running = self.pager.num_loads_running if self.pager is not None else 0
        seconds = 0.0
        if plan.sequences:
            self.num_steps += 1
            start = time.perf_counter()
            deltas += self._execute(plan, adapters, num_prompt_tokens)
            seconds = time.perf_counter() - start
        self._release_finished()
        self.last_report = StepReport(
            ran=self.last_step_ran,
            num_scheduled_tokens=plan.num_tokens,
            queue_seconds=tuple(self.scheduler.drain_queue_times()),
            adapter_loads=tuple(self._loads),
            expert_counts=tuple(self._expert_counts),
            num_prompt_tokens=num_prompt_tokens,
            num_sequences=len(plan.sequences),
            num_adapters=len(adapters),
            num_loads_running=num_loads_running,
            seconds=seconds,
        )
        self._loads.clear()
        self._expert_counts.clear()
        return deltas

    def wait_for_progress(self, timeout: float) -> None:
        """Block (up to timeout) until an adapter load finishes: call after a step that ran
        nothing, instead of spinning (a spinning loop would starve the loader threads)."""
        if self.pager is not None and self.pager.stats().loading:
            self.pager.wait(timeout)

    def _release_finished(self) -> None:
        for request in self.scheduler.drain_finished():
            if request.adapter is not None and self.pager is not None:
                self.pager.release(request.adapter)

    def stats(self) -> EngineStats:
        return EngineStats(
            scheduler=self.scheduler.stats(),
            pager=self.pager.stats() if self.pager is not None else None,
            num_steps=self.num_steps,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generated_tokens=self.num_generated_tokens,
        )
