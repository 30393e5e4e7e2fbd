"""AdapterPager: many adapters over one AdapterPool, in three tiers: disk -> host cache -> slots.

Threading model: one engine thread calls every method. Worker threads (`loads.LoadQueue`, each
driving a load worker process by default) only read, validate and pin, and hand back values that
`poll` collects; so the registry, in-flight
counts, host cache and slot table are mutated on the engine thread only and need no lock.

Invariants:
- an entry's uid is set while a copy is resident (host or slot) or loading, and is then the
  identity of that copy's files (`adapter_uid`): requests see the uid of what they are served.
- a slot pinned for the current step is never evicted, overwritten or cleared before unpin_all.
- an adapter with requests in flight keeps its host copy while it has no slot; if its slot is
  evicted after its host copy went, it is reloaded in the background (its files unchanged).
- on CPU the tiers are exclusive (`slot_readback`): an adapter written into a slot leaves the host
  cache, and is read back into it when its slot is about to be overwritten.

The tiers themselves (host cache, slot table, read-backs) are `tiers.AdapterTiers`; the pager
owns what requests and loads need of them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from mixserve.adapters.errors import AdapterNotFoundError
from mixserve.adapters.exchange_files import fresh_copies
from mixserve.adapters.loader import load_adapter
from mixserve.adapters.loads import AdapterLoadResult, Loader, LoadQueue, LoadTicket, adapter_uid
from mixserve.adapters.pager_state import AdapterState, PagerStats
from mixserve.adapters.pool import AdapterPool
from mixserve.adapters.tiers import AdapterTiers

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    path: str
    uid: int | None = None  # see the module invariants
    in_flight: int = 0
    loading: LoadTicket | None = None
    unloading: bool = False


class AdapterPager:
    """Registry of adapter folders, in-flight counts, background loads, the host cache and the
    slot table over one AdapterPool. Engine-thread only (see the module docstring).

    Per step the engine calls: `poll` (fail the requests of failed loads), `prefetch_slots`
    (free_only) for the loads that just finished, schedule among `is_ready` adapters,
    `prepare(names)` -> slots, run the forward, `unpin_all`.
    """

    def __init__(
        self,
        pool: AdapterPool,
        *,
        host_budget_bytes: int,
        max_workers: int = 2,
        pin_memory: bool | None = None,
        loader: Loader = load_adapter,
        host_copies: Callable[[list[torch.Tensor]], list[torch.Tensor]] = fresh_copies,
    ) -> None:
        """pool must be empty. pin_memory defaults to "the pool is on CUDA". loader is
        `load_adapter` or a stand-in with its signature (tests). host_copies makes the host
        copies of read-backs (exclusive tiers): the process loader's spare exchange files."""
        self.pool = pool
        pin = pool.device.type == "cuda" if pin_memory is None else pin_memory
        self._loads = LoadQueue(loader, pool.arch, pool.shape, pin=pin, max_workers=max_workers)
        self._entries: dict[str, _Entry] = {}
        self.tiers = AdapterTiers(
            pool,
            host_budget_bytes=host_budget_bytes,
            pin_memory=pin,
            host_copies=host_copies,
            is_busy=self._is_busy,
            busy_names=self._busy_names,
            on_copy_dropped=self._on_copy_dropped,
        )

    # Registry

    def add_source(self, name: str, path: str) -> None:
        """Register an adapter folder under name. The same folder again is a no-op; another
        folder re-points the name (dropping loaded copies) and needs the adapter idle."""
        entry = self._entries.get(name)
        if entry is not None:
            if entry.unloading:
                raise ValueError(f"adapter '{name}' is being unloaded")
            if os.path.realpath(entry.path) == os.path.realpath(path):
                return
            if entry.in_flight or entry.loading is not None:
                raise ValueError(f"adapter '{name}' is in use; unload it before re-pointing it")
            self.tiers.drop_copies(name)
        self._entries[name] = _Entry(path=path)

    def has_source(self, name: str) -> bool:
        """Registered and accepting requests (not being unloaded)."""
        entry = self._entries.get(name)
        return entry is not None and not entry.unloading

    def sources(self) -> dict[str, str]:
        """name -> folder of every adapter accepting requests."""
        return {n: e.path for n, e in self._entries.items() if not e.unloading}

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFoundError(name, "no adapter of this name is registered")
        return entry

    # Requests

    def acquire(self, name: str, *, hold: bool = False) -> int:
        """A request starts using the adapter: returns the uid of the weights it will be served
        and starts a background load if no copy is in memory or loading.

        When the adapter is idle its files are checked first, so a rewrite is picked up (stale
        copies are dropped); while requests use it, new requests share their copy. Raises
        AdapterNotFoundError for an unknown name, one being unloaded, or missing files (then
        nothing changed). hold: a load started now waits for `start_loads` (an engine on CPU);
        without it, a held load of the adapter starts now.
        """
        entry = self._entry(name)
        if entry.unloading:
            raise AdapterNotFoundError(name, "the adapter is being unloaded")
        if entry.loading is None and (entry.in_flight == 0 or entry.uid is None):
            current = adapter_uid(name, entry.path)
            if entry.uid is not None and entry.uid != current:
                logger.info("adapter '%s': files changed, dropping the old copies", name)
                self.tiers.drop_copies(name)
            entry.uid = current
        if entry.loading is None and not self.is_ready(name):
            self._submit(name, entry, hold=hold)
        elif entry.loading is not None and not hold:
            self._loads.start([entry.loading])  # no-op unless it is held
        entry.in_flight += 1
        assert entry.uid is not None
        return entry.uid

    def release(self, name: str) -> bool:
        """A request stopped using the adapter. Returns True if this completed an unload."""
        entry = self._entries.get(name)
        if entry is None or entry.in_flight < 1:
            raise ValueError(f"release of adapter '{name}' without a matching acquire")
        entry.in_flight -= 1
        if entry.in_flight == 0 and entry.unloading:
            self._finish_unload(name, entry)
            return True
        if entry.in_flight == 0:
            if entry.loading is not None and self._loads.is_held(entry.loading):
                self._loads.cancel(entry.loading)  # held for requests that are gone
                entry.loading = entry.uid = None  # nothing of it is resident or loading
            self.tiers.trim_host()  # its host copy may have just lost its protection
        return False

    def in_flight(self, name: str) -> int:
        return self._entry(name).in_flight

    def uid(self, name: str) -> int:
        """The uid `acquire` would return now (side-effect free): the in-use copy's identity
        while requests use it or it is loading, else that of the files on disk."""
        entry = self._entry(name)
        if entry.uid is not None and (entry.in_flight > 0 or entry.loading is not None):
            return entry.uid
        return adapter_uid(name, entry.path)

    def request_unload(self, name: str) -> bool:
        """Refuse new acquires; once no request is in flight, forget the adapter and free its
        host entry and slot. Returns True if that happened now."""
        entry = self._entry(name)
        entry.unloading = True
        if entry.in_flight == 0:
            self._finish_unload(name, entry)
            return True
        return False

    def _finish_unload(self, name: str, entry: _Entry) -> None:
        del self._entries[name]
        if entry.loading is not None:
            self._loads.cancel(entry.loading)  # if it already runs, poll discards the result
        self.tiers.drop_copies(name)
        logger.info("adapter '%s' unloaded", name)

    # Background loads

    def _submit(self, name: str, entry: _Entry, *, hold: bool = False) -> None:
        assert entry.uid is not None and entry.loading is None
        entry.loading = self._loads.submit(name, entry.path, entry.uid, hold=hold)

    def start_loads(self, names: Iterable[str] | None = None) -> int:
        """Start the held loads of names (unknown, ready or already started ones are skipped),
        or every held load; returns how many started."""
        if names is None:
            return self._loads.start()
        tickets = [e.loading for n in names if (e := self._entries.get(n)) and e.loading]
        return self._loads.start(tickets) if tickets else 0

    @property
    def num_loads_held(self) -> int:
        return self._loads.num_held

    @property
    def num_loads_started(self) -> int:
        """Loads queued for or running on a worker (held ones excluded)."""
        return self._loads.num_started

    def poll(self) -> list[AdapterLoadResult]:
        """Collect finished background loads (never blocks). A success goes into the host
        cache; a failure leaves the adapter not loaded, so a later acquire retries."""
        results = []
        for ticket, outcome in self._loads.collect():
            name = outcome.result.name
            entry = self._entries.get(name)
            if entry is None or entry.loading is not ticket:
                continue  # unloaded or re-pointed meanwhile: nobody waits for this copy
            entry.loading = None
            if outcome.weights is None:
                entry.uid = None  # nothing of it is resident: the next acquire re-reads files
            else:
                self.tiers.put_loaded(name, outcome.weights)
            results.append(outcome.result)
        return results

    @property
    def num_loads_running(self) -> int:
        """Background loads a worker is running now (each keeps one CPU busy)."""
        return self._loads.num_running

    def wait(self, timeout: float | None = None) -> bool:
        """Block until some background load finishes (for an engine with nothing else to do,
        and tests); False if none is running or the timeout passed."""
        return self._loads.wait(timeout)

    # Tiers

    def is_ready(self, name: str) -> bool:
        """In a slot or in the host cache: `prepare` can place it without touching disk."""
        return self.tiers.is_ready(name)

    def state(self, name: str) -> AdapterState:
        entry = self._entry(name)
        if name in self.tiers.slots:
            return AdapterState.SLOT
        if name in self.tiers.host:
            return AdapterState.HOST
        return AdapterState.LOADING if entry.loading is not None else AdapterState.NOT_LOADED

    def slot_of(self, name: str) -> int | None:
        return self.tiers.slots.slot_of(name)

    def _is_busy(self, name: str) -> bool:
        return self._entries[name].in_flight > 0

    def _busy_names(self) -> list[str]:
        return [n for n, e in self._entries.items() if e.in_flight > 0]

    def _on_copy_dropped(self, name: str) -> None:
        entry = self._entries.get(name)
        if entry is None or entry.loading is not None or self.is_ready(name):
            return
        if entry.in_flight > 0:
            # Its slot went after its host copy: reload, and the files must not have changed
            # (the load job checks the uid its requests were given).
            logger.info("adapter '%s' left memory while in use; reloading it", name)
            self._submit(name, entry)
        else:
            entry.uid = None

    def prepare(self, names: Iterable[str]) -> dict[str, int]:
        """Place every adapter of one step in a slot and pin those slots until `unpin_all`.

        Every name must be ready. Slot hits cost nothing; the rest are copied from the host
        cache (`SlotTable.place` picks the slots). On CUDA the current stream waits for the
        copies. Raises ValueError (changing nothing) if a name is not ready or they cannot all
        fit.
        """
        return self.tiers.prepare(names)

    def unpin_all(self) -> None:
        """The step's forward is enqueued (or done): its slots may be evicted again."""
        self.tiers.slots.unpin_all()

    def prefetch_slots(self, names: Iterable[str], *, free_only: bool = False) -> dict[str, int]:
        """Copy ready adapters into slots ahead of their step, only into free slots or
        (unless free_only) those of adapters no request uses (never pinned ones). Returns
        name -> slot of the copies made; the next `prepare` makes the compute stream wait for
        them."""
        return self.tiers.prefetch_slots(names, free_only=free_only)

    def stats(self) -> PagerStats:
        tiers, slots = self.tiers, self.tiers.slots
        host = tiers.host.stats()
        return PagerStats(
            loads=self._loads.succeeded,
            load_failures=self._loads.failed,
            load_seconds=self._loads.seconds,
            disk_loads=self._loads.started,
            slot_hits=tiers.slot_hits,
            host_hits=tiers.host_hits,
            prefetches=tiers.prefetches,
            host_evictions=host.evictions,
            slot_evictions=slots.evictions,
            host_resident=host.entries,
            host_bytes=host.nbytes,
            slots_in_use=slots.in_use,
            slots_pinned=len(slots.pinned),
            slots_total=self.pool.num_slots,
            loading=sum(e.loading is not None for e in self._entries.values()),
            registered=len(self._entries),
        )

    def close(self) -> None:
        """Stop the workers: queued loads are cancelled, running ones in worker processes
        fail at once (in-process ones finish)."""
        self._loads.close()

    def __enter__(self) -> AdapterPager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
