"""SlotTable: which adapter sits in which slot of an AdapterPool, LRU order and per-step pins.

All slot writes go through here. On CUDA they run on a side stream: each write first waits for
the slot's last reader (an event recorded on the compute stream at `unpin_all`), copies from
pinned host memory with non_blocking copies, and `sync_compute_stream` makes the compute stream
wait for every write issued so far. Only the engine thread uses a SlotTable.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch

from mixserve.adapters.pool import AdapterPool
from mixserve.adapters.weights import AdapterWeights

logger = logging.getLogger(__name__)


def _to_device(weights: AdapterWeights, device: torch.device) -> AdapterWeights:
    """Asynchronous host-to-device copies on the current stream (sources are pinned on CUDA).

    The pool's own copies are then device-to-device, which never block the host; copying pinned
    tensors straight into the pool would (copy_ without non_blocking syncs its stream).
    """

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    return weights.map_tensors(move)


class SlotTable:
    """Slot bookkeeping over an (initially empty) AdapterPool.

    Invariants: ``names[s] == n`` iff ``slot_of(n) == s``; a pinned slot is never written,
    evicted or cleared (a clear asked for while pinned waits for `unpin_all`).
    """

    def __init__(self, pool: AdapterPool) -> None:
        if any(name is not None for name in pool.names):
            raise ValueError("the adapter pool must start empty: the pager owns every slot")
        self.pool = pool
        self.names: list[str | None] = [None] * pool.num_slots
        self._slot_of: dict[str, int] = {}
        self._last_used = [0] * pool.num_slots  # tick of the last step/prefetch; LRU = smallest
        self._tick = 0
        self._pinned: set[int] = set()
        self._pending_clear: set[int] = set()
        self.evictions = 0
        self._cuda = pool.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=pool.device) if self._cuda else None
        self._reader_done: dict[int, torch.cuda.Event] = {}  # slot -> its last step's end
        # Called with (slot, the adapter leaving it, the one coming in) once a write is known
        # to succeed, just before it overwrites the slot (the pager's exclusive tiers read the
        # leaving adapter back into the host cache there).
        self.before_evict: Callable[[int, str, str], None] | None = None

    @property
    def num_slots(self) -> int:
        return self.pool.num_slots

    def slot_of(self, name: str) -> int | None:
        return self._slot_of.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._slot_of

    @property
    def in_use(self) -> int:
        return len(self._slot_of)

    @property
    def pinned(self) -> frozenset[int]:
        return frozenset(self._pinned)

    def pin(self, slot: int) -> None:
        """Pin for the current step and mark most recently used."""
        self._pinned.add(slot)
        self.touch(slot)

    def touch(self, slot: int) -> None:
        self._tick += 1
        self._last_used[slot] = self._tick

    def victim(self, is_busy: Callable[[str], bool], *, idle_only: bool) -> int | None:
        """The slot to (over)write next: a free one, else the least recently used unpinned one,
        preferring adapters no request is using (idle_only: only those), else None."""
        best: tuple[bool, int] | None = None
        choice = None
        for slot, name in enumerate(self.names):
            if slot in self._pinned:
                continue
            if name is None:
                return slot
            busy = is_busy(name)
            if idle_only and busy:
                continue
            key = (busy, self._last_used[slot])
            if best is None or key < best:
                best, choice = key, slot
        return choice

    def place(
        self,
        names: list[str],
        weights_of: Callable[[str], AdapterWeights],
        is_busy: Callable[[str], bool],
    ) -> tuple[dict[str, int], list[str]]:
        """Pin a slot for each of names (distinct) for the current step: resident adapters where
        they are, the others written (weights_of) into free slots, else into the least recently
        used unpinned ones, of adapters no request uses first. Returns (name -> slot, the
        adapters evicted). Raises ValueError, changing nothing, if they cannot all fit."""
        hits = {n: s for n in names if (s := self.slot_of(n)) is not None}
        taken = self._pinned | set(hits.values())
        if len(names) - len(hits) > self.num_slots - len(taken):
            raise ValueError(
                f"{len(names)} adapters do not fit {self.num_slots} slots "
                f"({len(self._pinned)} pinned already)"
            )
        for slot in hits.values():
            self.pin(slot)
        placed: dict[str, int] = {}
        evicted: list[str] = []
        for name in names:
            slot = hits.get(name)
            if slot is None:
                slot = self.victim(is_busy, idle_only=False)
                assert slot is not None, "counted above"
                dropped = self.write(slot, weights_of(name))
                if dropped is not None:
                    evicted.append(dropped)
                self.pin(slot)
            placed[name] = slot
        return placed, evicted

    @contextlib.contextmanager
    def _writing(self, slot: int) -> Iterator[None]:
        if self._stream is None:
            yield
            return
        with torch.cuda.stream(self._stream):
            done = self._reader_done.pop(slot, None)
            if done is not None:
                self._stream.wait_event(done)  # the last step reading this slot has finished
            yield

    def write(self, slot: int, weights: AdapterWeights) -> str | None:
        """Load weights into an unpinned slot; returns the adapter it evicted, if any.

        The pool validates before touching the slot, so if it raises the slot (and this table)
        still hold the previous adapter.
        """
        if slot in self._pinned:
            raise RuntimeError(f"slot {slot} is pinned by the current step")
        leaving = self.names[slot]
        if leaving is not None and self.before_evict is not None:
            self.pool.check_loadable(slot, weights)  # a refused write must not evict anything
            self.before_evict(slot, leaving, weights.name)
        with self._writing(slot):
            if self._cuda:
                weights = _to_device(weights, self.pool.device)
            self.pool.load(slot, weights)
        self._pending_clear.discard(slot)
        evicted = self.names[slot]
        if evicted is not None:
            del self._slot_of[evicted]
            self.evictions += 1
        self.names[slot] = weights.name
        self._slot_of[weights.name] = slot
        return evicted

    def remove(self, name: str) -> None:
        """Forget an adapter's slot (an unload) and clear it, once no step reads it."""
        slot = self._slot_of.pop(name, None)
        if slot is None:
            return
        self.names[slot] = None
        if slot in self._pinned:
            self._pending_clear.add(slot)
        else:
            self._clear(slot)

    def _clear(self, slot: int) -> None:
        with self._writing(slot):
            self.pool.clear(slot)

    def sync_compute_stream(self) -> None:
        """Make the current stream wait for all slot writes issued so far (no-op on CPU)."""
        if self._stream is not None:
            torch.cuda.current_stream(self.pool.device).wait_stream(self._stream)

    def unpin_all(self) -> None:
        """End of a step: its slots may be rewritten once the work queued so far completes."""
        if self._cuda and self._pinned:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.pool.device))
            for slot in self._pinned:
                self._reader_done[slot] = done
        pending, self._pending_clear, self._pinned = self._pending_clear, set(), set()
        for slot in pending:  # only pinned slots were deferred, and none was rewritten since
            self._clear(slot)
