"""AdapterPager's memory tiers: the host cache and the slot table over one AdapterPool, and on
CPU the adapters whose one copy is their slot (exclusive tiers, `slot_readback`).

Engine-thread only, like the pager, which tells the tiers what its registry knows: whether
requests use an adapter (such copies are never evicted while they have no other) and what to
do when an adapter's last in-memory copy goes (reload it for its requests, or forget its uid).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from mixserve.adapters.host_cache import HostCache
from mixserve.adapters.pool import AdapterPool
from mixserve.adapters.slot_readback import read_slot, skeleton, stored_exactly
from mixserve.adapters.slots import SlotTable
from mixserve.adapters.weights import AdapterWeights


class AdapterTiers:
    """Host cache -> slots: placing a step's adapters, prefetching, evicting, reading back."""

    def __init__(
        self,
        pool: AdapterPool,
        *,
        host_budget_bytes: int,
        pin_memory: bool,
        host_copies: Callable[[list[torch.Tensor]], list[torch.Tensor]],
        is_busy: Callable[[str], bool],
        busy_names: Callable[[], Iterable[str]],
        on_copy_dropped: Callable[[str], None],
    ) -> None:
        """is_busy(name) / busy_names(): whether requests use an adapter / the adapters they
        use now; on_copy_dropped(name): an adapter just lost a copy (it may still be ready in
        the other tier)."""
        self.pool = pool
        self.slots = SlotTable(pool)
        self.host = HostCache(host_budget_bytes, pin_memory=pin_memory)
        self.host_copies = host_copies
        self._is_busy = is_busy
        self._busy_names = busy_names
        self._on_copy_dropped = on_copy_dropped
        self.slot_hits = self.host_hits = self.prefetches = 0
        # On CPU a slot is host memory too, so a second copy in the host cache only doubles an
        # active adapter's memory (and the pages every cold load faults in): the adapters whose
        # one copy is their slot, by name, as skeletons to read them back by.
        self._slot_only: dict[str, AdapterWeights] | None = None
        if pool.device.type == "cpu":
            self._slot_only = {}
            self.slots.before_evict = self._read_back

    def is_ready(self, name: str) -> bool:
        """In a slot or in the host cache: `prepare` can place it without touching disk."""
        return name in self.slots or name in self.host

    def _protected(self) -> set[str]:
        """Host entries that must stay: wanted by requests and in no slot."""
        return {n for n in self._busy_names() if n not in self.slots}

    def put_loaded(self, name: str, weights: AdapterWeights) -> None:
        """A finished load goes into the host cache (evicting idle entries over budget)."""
        self._on_host_evicted(self.host.put(name, weights, self._protected()))

    def trim_host(self) -> None:
        if self.host.nbytes > self.host.budget_bytes:
            self._on_host_evicted(self.host.evict_until_fits(self._protected()))

    def _on_host_evicted(self, names: Iterable[str]) -> None:
        for name in names:
            self._on_copy_dropped(name)

    def drop_copies(self, name: str) -> None:
        self.host.pop(name)
        self.slots.remove(name)
        if self._slot_only is not None:
            self._slot_only.pop(name, None)

    def _leave_host(self, name: str) -> None:
        """Exclusive tiers: an adapter just written into a slot keeps no host copy."""
        weights = self.host.peek(name) if self._slot_only is not None else None
        if weights is not None and stored_exactly(self.pool, weights):
            self.host.pop(name)
            self._slot_only[name] = skeleton(weights)  # type: ignore[index]

    def _read_back(self, slot: int, name: str, incoming: str) -> None:
        """Exclusive tiers: the slot of name is about to be overwritten by incoming; name's
        only copy goes back into the host cache. Over budget that put evicts idle entries, never
        incoming (about to be written from its host copy) nor name while requests use it."""
        assert self._slot_only is not None
        like = self._slot_only.pop(name, None)
        if like is not None:
            weights = read_slot(self.pool, slot, like, self.host_copies)
            keep = self._protected() | {incoming} | ({name} if self._is_busy(name) else set())
            self._on_host_evicted(self.host.put(name, weights, keep))

    def _host_weights(self, name: str) -> AdapterWeights:
        weights = self.host.get(name)
        assert weights is not None, "callers check is_ready"
        return weights

    def prepare(self, names: Iterable[str]) -> dict[str, int]:
        """AdapterPager.prepare: place every (ready) adapter of one step in a slot and pin
        those slots until `unpin_all`."""
        wanted = list(dict.fromkeys(names))
        not_ready = [n for n in wanted if not self.is_ready(n)]
        if not_ready:
            raise ValueError(f"adapters not in a slot or the host cache: {not_ready}")
        hits = {n for n in wanted if n in self.slots}
        placed, evicted = self.slots.place(wanted, self._host_weights, self._is_busy)
        for name in evicted:
            self._on_copy_dropped(name)
        for name in wanted:
            if name not in hits:
                self._leave_host(name)
        self.slot_hits += len(hits)
        self.host_hits += len(wanted) - len(hits)
        self.slots.sync_compute_stream()
        self.trim_host()
        return placed

    def prefetch_slots(self, names: Iterable[str], *, free_only: bool = False) -> dict[str, int]:
        """AdapterPager.prefetch_slots: copy ready adapters into free slots or (unless
        free_only) those of adapters no request uses."""
        placed: dict[str, int] = {}
        for name in dict.fromkeys(names):
            if name in self.slots or name not in self.host:
                continue
            slot = self.slots.victim(self._is_busy, idle_only=True)  # a free one first
            if slot is None or (free_only and self.slots.names[slot] is not None):
                break
            evicted = self.slots.write(slot, self._host_weights(name))
            if evicted is not None:
                self._on_copy_dropped(evicted)
            self._leave_host(name)
            self.slots.touch(slot)
            placed[name] = slot
        self.prefetches += len(placed)
        return placed
