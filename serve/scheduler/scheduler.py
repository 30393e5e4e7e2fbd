"""Continuous batching: which sequences run each step, how many tokens each (pure Python).

Per step, under a token budget and a cap on running sequences:
1. running sequences in priority order (arrival, then completion index): a decode token or the
   next prefill chunk; when KV blocks run out the lowest-priority running sequence is preempted
   (its blocks freed; it is recomputed later, same output since sampling is keyed on positions);
2. waiting sequences FCFS, while budget, sequence slots and blocks last. A request whose adapter is
   still loading is skipped without holding up the rest. One held back by the adapter cap may be
   passed by later requests of adapters already in the step (more sequences per resident adapter),
   at most `max_adapter_bypass` times; after that it stops admission like any other reason to stop
   (no blocks), so nothing is starved by later arrivals.
Never more distinct adapters in one step than there are adapter slots; the scheduler does not
know slot numbers, only the cap.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable

from mixserve.config import SchedulerConfig
from mixserve.scheduler.block_manager import BlockManager
from mixserve.scheduler.requests import RequestQueues
from mixserve.scheduler.sequence import Sequence, SequenceStatus
from mixserve.types import (
    RunnerOutput,
    SampledToken,
    ScheduledSequence,
    SchedulerOutput,
    TokenDelta,
)


class Scheduler(RequestQueues):
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        *,
        max_adapters_per_step: int,
        eos_token_ids: frozenset[int],
        max_model_len: int,
    ) -> None:
        super().__init__(block_manager, eos_token_ids=eos_token_ids, max_model_len=max_model_len)
        self.config = config
        self.max_adapters_per_step = max_adapters_per_step

    # -- scheduling ----------------------------------------------------------------------------

    def next_admission_adapters(self) -> list[str]:
        """Adapters of the waiting sequences that the running cap admits next, in queue order,
        each once: the loads the next steps can use."""
        seats = max(self.config.max_num_seqs - len(self.running), 0)
        adapters = (seq.request.adapter for seq in self.waiting[:seats])
        return list(dict.fromkeys(a for a in adapters if a is not None))

    def _plan_entry(self, seq: Sequence, num_new: int) -> ScheduledSequence:
        request = seq.request
        start = seq.num_computed_tokens
        sample = start + num_new == seq.num_tokens
        forks = sample and request.sampling.n > 1 and not request.forked
        return ScheduledSequence(
            seq_id=seq.seq_id,
            token_ids=seq.token_slice(start, start + num_new),
            num_computed_tokens=start,
            block_ids=self.blocks.block_table(seq.seq_id),
            adapter=request.adapter,
            sample=sample,
            sampling=request.sampling,
            num_output_tokens=len(seq.output_token_ids),
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=seq.output_token_ids,
            num_samples=request.sampling.n if forks else 1,
            sample_index=seq.index,
        )

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        self._pending_copies.pop(seq.seq_id, None)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.priority)
        self.num_preemptions += 1

    def _fits_adapter(self, adapter: str | None, step_adapters: set[str]) -> bool:
        return (
            adapter is None
            or adapter in step_adapters
            or len(step_adapters) < self.max_adapters_per_step
        )

    def schedule(self, adapter_ready: Callable[[str], bool] = lambda _: True) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        planned: list[ScheduledSequence] = []
        step_adapters: set[str] = set()
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            adapter = seq.request.adapter
            if not self._fits_adapter(adapter, step_adapters):
                index += 1
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            preempted_self = False
            while not self.blocks.allocate(seq.seq_id, seq.num_computed_tokens + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    preempted_self = True
                    break
            if preempted_self:
                break  # everything after it was preempted first
            planned.append(self._plan_entry(seq, num_new))
            budget -= num_new
            if adapter is not None:
                step_adapters.add(adapter)
            index += 1
        self._admit(planned, step_adapters, budget, adapter_ready)
        copies = tuple(self._pending_copies.values())
        self._pending_copies.clear()
        return SchedulerOutput(tuple(planned), copies)

    def _admit(
        self,
        planned: list[ScheduledSequence],
        step_adapters: set[str],
        budget: int,
        adapter_ready: Callable[[str], bool],
    ) -> None:
        bs = self.blocks.block_size
        readiness: dict[str, bool] = {}  # asked once per adapter per step
        held_back: Sequence | None = None  # the oldest sequence the adapter cap holds back
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                return
            request = seq.request
            adapter = request.adapter
            if adapter is not None:
                if adapter not in readiness:
                    readiness[adapter] = adapter_ready(adapter)
                if not readiness[adapter]:
                    continue  # still loading: later requests may run meanwhile
            if not self._fits_adapter(adapter, step_adapters):
                if held_back is None:
                    if seq.num_bypassed >= self.config.max_adapter_bypass:
                        return
                    held_back = seq
                continue
            tokens = seq.all_token_ids()
            cached = self.blocks.find_cached_prefix(tokens, request.adapter_key)
            num_cached = len(cached) * bs
            num_new = min(len(tokens) - num_cached, budget)
            if not self.blocks.allocate(
                seq.seq_id,
                num_cached + num_new,
                cached_blocks=cached,
                adapter=request.adapter_key,
                token_ids=tokens,
            ):
                return
            self.waiting.remove(seq)
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                self._queue_times.append(request.first_scheduled_time - request.arrival_time)
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.priority)
            planned.append(self._plan_entry(seq, num_new))
            budget -= num_new
            if adapter is not None:
                step_adapters.add(adapter)
            if held_back is not None:
                held_back.num_bypassed += 1
                if held_back.num_bypassed >= self.config.max_adapter_bypass:
                    return

    # -- results -------------------------------------------------------------------------------

    def update(self, plan: SchedulerOutput, output: RunnerOutput) -> list[TokenDelta]:
        deltas: list[TokenDelta] = []
        for entry in plan.sequences:
            seq = self._seqs.get(entry.seq_id)
            if seq is None or seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += len(entry.token_ids)
            request = seq.request
            self.blocks.commit(
                seq.seq_id, seq.all_token_ids(), seq.num_computed_tokens, request.adapter_key
            )
            sampled = output.sampled.get(entry.seq_id)
            if not entry.sample or not sampled:
                continue
            if entry.num_samples > 1:
                deltas.extend(self._fork(seq, sampled[1:]))
            deltas.append(self._append(seq, sampled[0]))
        return deltas

    def _fork(self, parent: Sequence, tokens: Iterable[SampledToken]) -> list[TokenDelta]:
        """Completions 1..n-1 share the parent's prompt blocks (a partial last block is copied);
        without the blocks for that copy they re-run the prompt, mostly from the prefix cache."""
        request = parent.request
        request.forked = True
        deltas = []
        num_prompt = len(request.prompt_token_ids)
        tokens = list(tokens)
        room = len(self.running) + len(tokens) <= self.config.max_num_seqs
        explicit = room and self.blocks.can_fork(num_prompt, len(tokens))
        for index, token in enumerate(tokens, start=1):
            child = self._new_sequence(request, index, [])
            if explicit:
                self.waiting.remove(child)
                copy = self.blocks.fork(parent.seq_id, child.seq_id, num_prompt)
                if copy is not None:
                    self._pending_copies[child.seq_id] = copy
                child.num_computed_tokens = num_prompt
                child.status = SequenceStatus.RUNNING
                bisect.insort(self.running, child, key=lambda s: s.priority)
            deltas.append(self._append(child, token))
        return deltas
