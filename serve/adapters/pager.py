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
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from mixserve.adapters.errors import AdapterNotFoundError
from mixserve.adapters.exchange_files import fresh_copies
from mixserve.adapters.host_cache import HostCache
from mixserve.adapters.loader import load_adapter
from mixserve.adapters.loads import AdapterLoadResult, Loader, LoadQueue, LoadTicket, adapter_uid
from mixserve.adapters.pager_state import AdapterState, PagerStats
from mixserve.adapters.pool import AdapterPool
from mixserve.adapters.slot_readback import read_slot, skeleton, stored_exactly
from mixserve.adapters.slots import SlotTable
from mixserve.adapters.weights import AdapterWeights

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
        self._slots = SlotTable(pool)
        pin = pool.device.type == "cuda" if pin_memory is None else pin_memory
        self._host = HostCache(host_budget_bytes, pin_memory=pin)
        self._loads = LoadQueue(loader, pool.arch, pool.shape, pin=pin, max_workers=max_workers)
        self._entries: dict[str, _Entry] = {}
        self._slot_hits = self._host_hits = self._prefetches = 0
        # On CPU a slot is host memory too, so a second copy in the host cache only doubles an
        # active adapter's memory (and the pages every cold load faults in): the adapters whose
        # one copy is their slot, by name, as skeletons to read them back by.
        self._slot_only: dict[str, AdapterWeights] | None = None
        self._host_copies = host_copies
        if pool.device.type == "cpu":
            self._slot_only = {}
            self._slots.before_evict = self._read_back

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
            self._drop_copies(name)
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
                self._drop_copies(name)
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
            self._trim_host()  # its host copy may have just lost its protection
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
        self._drop_copies(name)
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
                self._on_host_evicted(self._host.put(name, outcome.weights, self._protected()))
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
        return name in self._slots or name in self._host

    def state(self, name: str) -> AdapterState:
        entry = self._entry(name)
        if name in self._slots:
            return AdapterState.SLOT
        if name in self._host:
            return AdapterState.HOST
        return AdapterState.LOADING if entry.loading is not None else AdapterState.NOT_LOADED

    def slot_of(self, name: str) -> int | None:
        return self._slots.slot_of(name)

    def _is_busy(self, name: str) -> bool:
        return self._entries[name].in_flight > 0

    def _protected(self) -> set[str]:
        """Host entries that must stay: wanted by requests and in no slot."""
        return {n for n, e in self._entries.items() if e.in_flight > 0 and n not in self._slots}

    def _trim_host(self) -> None:
        if self._host.nbytes > self._host.budget_bytes:
            self._on_host_evicted(self._host.evict_until_fits(self._protected()))

    def _on_host_evicted(self, names: Iterable[str]) -> None:
        for name in names:
            self._on_copy_dropped(name)

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

    def _drop_copies(self, name: str) -> None:
        self._host.pop(name)
        self._slots.remove(name)
        if self._slot_only is not None:
            self._slot_only.pop(name, None)

    def _leave_host(self, name: str) -> None:
        """Exclusive tiers: an adapter just written into a slot keeps no host copy."""
        weights = self._host.peek(name) if self._slot_only is not None else None
        if weights is not None and stored_exactly(self.pool, weights):
            self._host.pop(name)
            self._slot_only[name] = skeleton(weights)  # type: ignore[index]

    def _read_back(self, slot: int, name: str, incoming: str) -> None:
        """Exclusive tiers: the slot of name is about to be overwritten by incoming; name's
        only copy goes back into the host cache. Over budget that put evicts idle entries, never
        incoming (about to be written from its host copy) nor name while requests use it."""
        assert self._slot_only is not None
        like = self._slot_only.pop(name, None)
        if like is not None:
            weights = read_slot(self.pool, slot, like, self._host_copies)
            keep = self._protected() | {incoming} | ({name} if self._is_busy(name) else set())
            self._on_host_evicted(self._host.put(name, weights, keep))

    def _host_weights(self, name: str) -> AdapterWeights:
        weights = self._host.get(name)
        assert weights is not None, "callers check is_ready"
        return weights

    def prepare(self, names: Iterable[str]) -> dict[str, int]:
        """Place every adapter of one step in a slot and pin those slots until `unpin_all`.

        Every name must be ready. Slot hits cost nothing; the rest are copied from the host
        cache (`SlotTable.place` picks the slots). On CUDA the current stream waits for the
        copies. Raises ValueError (changing nothing) if a name is not ready or they cannot all
        fit.
        """
        wanted = list(dict.fromkeys(names))
        not_ready = [n for n in wanted if not self.is_ready(n)]
        if not_ready:
            raise ValueError(f"adapters not in a slot or the host cache: {not_ready}")
        hits = {n for n in wanted if n in self._slots}
        placed, evicted = self._slots.place(wanted, self._host_weights, self._is_busy)
        for name in evicted:
            self._on_copy_dropped(name)
        for name in wanted:
            if name not in hits:
                self._leave_host(name)
        self._slot_hits += len(hits)
        self._host_hits += len(wanted) - len(hits)
        self._slots.sync_compute_stream()
        self._trim_host()
        return placed

    def unpin_all(self) -> None:
        """The step's forward is enqueued (or done): its slots may be evicted again."""
        self._slots.unpin_all()

    def prefetch_slots(self, names: Iterable[str], *, free_only: bool = False) -> dict[str, int]:
        """Copy ready adapters into slots ahead of their step, only into free slots or
        (unless free_only) those of adapters no request uses (never pinned ones). Returns
        name -> slot of the copies made; the next `prepare` makes the compute stream wait for
        them."""
        placed: dict[str, int] = {}
        for name in dict.fromkeys(names):
            if name in self._slots or name not in self._host:
                continue
            slot = self._slots.victim(self._is_busy, idle_only=True)  # a free one first
            if slot is None or (free_only and self._slots.names[slot] is not None):
                break
            evicted = self._slots.write(slot, self._host_weights(name))
            if evicted is not None:
                self._on_copy_dropped(evicted)
            self._leave_host(name)
            self._slots.touch(slot)
            placed[name] = slot
        self._prefetches += len(placed)
        return placed

    def stats(self) -> PagerStats:
        host = self._host.stats()
        return PagerStats(
            loads=self._loads.succeeded,
            load_failures=self._loads.failed,
            load_seconds=self._loads.seconds,
            disk_loads=self._loads.started,
            slot_hits=self._slot_hits,
            host_hits=self._host_hits,
            prefetches=self._prefetches,
            host_evictions=host.evictions,
            slot_evictions=self._slots.evictions,
            host_resident=host.entries,
            host_bytes=host.nbytes,
            slots_in_use=self._slots.in_use,
            slots_pinned=len(self._slots.pinned),
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
