"""HostCache: the host-memory tier of adapter weights, an LRU by name under a byte budget.

Not thread-safe: the pager uses it from the engine thread only. On CUDA entries are kept in
pinned (page-locked) memory so host-to-device copies can be asynchronous.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Collection

import torch

from mixserve.adapters.weights import AdapterWeights

logger = logging.getLogger(__name__)


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.is_pinned() else tensor.pin_memory()


def pin_weights(weights: AdapterWeights) -> AdapterWeights:
    """The same weights with every tensor in pinned memory (tensors already pinned are kept).

    Safe to call on a worker thread; the pager pins there so the engine thread does not pay for
    the copy into page-locked memory.
    """
    return weights.map_tensors(_pinned)


@dataclasses.dataclass(frozen=True, slots=True)
class HostCacheStats:
    entries: int
    nbytes: int
    budget_bytes: int
    hits: int  # get() found the name
    misses: int  # get() did not
    insertions: int
    evictions: int
    over_budget: int  # times the cache went over budget because all that was left was protected


class HostCache:
    """LRU of validated `AdapterWeights` by name; an entry's size is ``weights.nbytes``.

    Invariant after every put/evict_until_fits: ``nbytes <= budget_bytes`` unless every entry
    left is protected (then a warning is logged: running requests need them more than the
    budget needs honoring, and a failed request would be worse than a temporary overshoot).
    """

    def __init__(self, budget_bytes: int, pin_memory: bool) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.pin_memory = pin_memory
        self._entries: OrderedDict[str, AdapterWeights] = OrderedDict()  # LRU first
        self._nbytes = 0
        self._hits = self._misses = self._insertions = self._evictions = self._over = 0
        self._is_over = False  # over budget since the last eviction pass

    def __contains__(self, name: object) -> bool:
        """Membership without touching the LRU order."""
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def names(self) -> list[str]:
        """Cached names, least recently used first."""
        return list(self._entries)

    def get(self, name: str) -> AdapterWeights | None:
        """The cached weights (now the most recently used entry), or None."""
        weights = self._entries.get(name)
        if weights is None:
            self._misses += 1
            return None
        self._entries.move_to_end(name)
        self._hits += 1
        return weights

    def put(self, name: str, weights: AdapterWeights, protected: Collection[str] = ()) -> list[str]:
        """Insert (or replace) as most recently used, then evict down to the budget.

        Tensors are pinned first when pin_memory is set. Returns the evicted names, which may
        include name itself when it is not protected and alone exceeds the budget.
        """
        if self.pin_memory:
            weights = pin_weights(weights)
        old = self._entries.pop(name, None)
        if old is not None:
            self._nbytes -= old.nbytes
        self._entries[name] = weights
        self._nbytes += weights.nbytes
        self._insertions += 1
        return self.evict_until_fits(protected)

    def peek(self, name: str) -> AdapterWeights | None:
        """The cached weights, touching neither the LRU order nor the hit counts."""
        return self._entries.get(name)

    def pop(self, name: str) -> AdapterWeights | None:
        """Remove an entry (an unload, not an eviction: no eviction is counted)."""
        weights = self._entries.pop(name, None)
        if weights is not None:
            self._nbytes -= weights.nbytes
        return weights

    def evict_until_fits(self, protected: Collection[str] = ()) -> list[str]:
        """Evict least recently used unprotected entries until the budget holds."""
        evicted: list[str] = []
        for name in list(self._entries):
            if self._nbytes <= self.budget_bytes:
                break
            if name in protected:
                continue
            self._nbytes -= self._entries.pop(name).nbytes
            evicted.append(name)
        self._evictions += len(evicted)
        over = self._nbytes > self.budget_bytes
        if over and not self._is_over:  # warn once per overshoot, not on every trim
            self._over += 1
            logger.warning(
                "adapter host cache holds %d bytes over its %d-byte budget: the %d entries "
                "left are all needed by requests",
                self._nbytes - self.budget_bytes,
                self.budget_bytes,
                len(self._entries),
            )
        self._is_over = over
        return evicted

    def stats(self) -> HostCacheStats:
        return HostCacheStats(
            entries=len(self._entries),
            nbytes=self._nbytes,
            budget_bytes=self.budget_bytes,
            hits=self._hits,
            misses=self._misses,
            insertions=self._insertions,
            evictions=self._evictions,
            over_budget=self._over,
        )
