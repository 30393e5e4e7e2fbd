"""The scheduler's bookkeeping (pure Python): requests, their sequences, the waiting and running
queues, and how a sequence ends.

Invariants: every unfinished sequence is in exactly one of `waiting` and `running`, each sorted
by priority (arrival, then completion index); a sequence holds KV blocks only while running; a
request leaves `requests` once all its sequences (and completions not yet forked) are finished.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable
from dataclasses import dataclass

from mixserve.scheduler.block_manager import BlockManager
from mixserve.scheduler.sequence import Request, Sequence, SequenceStatus
from mixserve.types import FinishReason, SampledToken, SamplingParams, TokenDelta


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preemptions: int  # since start
    kv_usage: float  # fraction of KV blocks in use
    prefix_queried_tokens: int  # since start
    prefix_hit_tokens: int  # since start


class RequestQueues:
    """Requests and sequences by id, the two queues, and finishing; `Scheduler` plans on top."""

    def __init__(
        self, block_manager: BlockManager, *, eos_token_ids: frozenset[int], max_model_len: int
    ) -> None:
        self.blocks = block_manager
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.waiting: list[Sequence] = []  # sorted by priority
        self.running: list[Sequence] = []  # sorted by priority
        self.requests: dict[str, Request] = {}
        self._seqs: dict[int, Sequence] = {}
        self._next_seq_id = 0
        self._next_arrival = 0
        self._pending_copies: dict[int, tuple[int, int]] = {}  # child seq_id -> (src, dst) block
        self._finished: list[Request] = []
        self._queue_times: list[float] = []  # seconds from arrival to first scheduling
        self.num_preemptions = 0

    # -- requests ------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        adapter: str | None = None,
        adapter_key: Hashable = None,
    ) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if not prompt_token_ids:
            raise ValueError("empty prompt")
        total = len(prompt_token_ids) + sampling.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({sampling.max_tokens}) "
                f"exceed max_model_len ({self.max_model_len})"
            )
        if self.blocks.blocks_needed(total) > self.blocks.num_blocks:
            raise ValueError(f"request needs more KV blocks than the cache holds ({total} tokens)")
        request = Request(
            request_id, list(prompt_token_ids), sampling, adapter, adapter_key, self._next_arrival
        )
        self._next_arrival += 1
        self.requests[request_id] = request
        self._new_sequence(request, 0, [])

    def _new_sequence(self, request: Request, index: int, output: list[int]) -> Sequence:
        seq = Sequence(self._next_seq_id, request, index, output_token_ids=output)
        self._next_seq_id += 1
        request.sequences.append(seq)
        self._seqs[seq.seq_id] = seq
        bisect.insort(self.waiting, seq, key=lambda s: s.priority)
        return seq

    def abort(self, request_id: str) -> list[TokenDelta]:
        return self._end_request(request_id, FinishReason.ABORT, None)

    def fail(self, request_id: str, error: str) -> list[TokenDelta]:
        return self._end_request(request_id, FinishReason.ERROR, error)

    def _end_request(
        self, request_id: str, reason: FinishReason, error: str | None
    ) -> list[TokenDelta]:
        request = self.requests.get(request_id)
        if request is None:
            return []
        deltas = []
        indices = {s.index for s in request.sequences}
        for seq in request.sequences:
            if seq.status is not SequenceStatus.FINISHED:
                self._finish(seq, reason)
                deltas.append(TokenDelta(request_id, seq.index, (), (), reason, error))
        if not request.forked:  # completions that do not exist yet end too
            for index in range(request.sampling.n):
                if index not in indices:
                    deltas.append(TokenDelta(request_id, index, (), (), reason, error))
            request.forked = True
        self._retire(request)
        return deltas

    def request_ids_waiting_for(self, adapter: str) -> list[str]:
        """Requests of this adapter that no step has run yet (they wait for its load)."""
        return [
            r.request_id
            for r in self.requests.values()
            if r.adapter == adapter and all(s.status is SequenceStatus.WAITING for s in r.sequences)
        ]

    def request_id_of(self, seq_id: int) -> str | None:
        seq = self._seqs.get(seq_id)
        return seq.request.request_id if seq is not None else None

    def drain_queue_times(self) -> list[float]:
        """Queue times (arrival to first scheduled) of requests first scheduled since last call."""
        times, self._queue_times = self._queue_times, []
        return times

    def drain_finished(self) -> list[Request]:
        finished, self._finished = self._finished, []
        return finished

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> SchedulerStats:
        p = self.blocks.prefix_stats
        return SchedulerStats(
            len(self.running),
            len(self.waiting),
            self.num_preemptions,
            self.blocks.usage,
            p.queried_tokens,
            p.hit_tokens,
        )

    def _append(self, seq: Sequence, token: SampledToken) -> TokenDelta:
        """A sampled token joins the sequence; a stop id, EOS (unless ignored), max_tokens or
        max_model_len ends it."""
        seq.output_token_ids.append(token.token_id)
        if token.logprob is not None:
            seq.logprobs.append(token.logprob)
        params = seq.request.sampling
        reason = None
        if token.token_id in params.stop_token_ids or (
            not params.ignore_eos and token.token_id in self.eos_token_ids
        ):
            reason = FinishReason.STOP
        elif len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self._finish(seq, reason)
            self._retire(seq.request)
        logprobs = (token.logprob,) if token.logprob is not None else ()
        return TokenDelta(seq.request.request_id, seq.index, (token.token_id,), logprobs, reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        self._pending_copies.pop(seq.seq_id, None)
        self._seqs.pop(seq.seq_id, None)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _retire(self, request: Request) -> None:
        if request.finished and self.requests.pop(request.request_id, None) is not None:
            self._finished.append(request)
