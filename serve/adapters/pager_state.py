"""What the AdapterPager reports: an adapter's tier, and counters over its lifetime."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class AdapterState(str, enum.Enum):
    NOT_LOADED = "not_loaded"  # only on disk
    LOADING = "loading"  # a background load is held, queued, running, or finished not yet polled
    HOST = "host"  # in the host cache, in no slot
    SLOT = "slot"  # in a slot (and maybe in the host cache too)


@dataclass(frozen=True, slots=True)
class PagerStats:
    loads: int  # background loads that succeeded
    load_failures: int
    load_seconds: float  # worker time reading + validating, successful loads
    disk_loads: int  # background loads started (misses of both memory tiers)
    slot_hits: int  # prepare: already in a slot
    host_hits: int  # prepare: copied from the host cache into a slot
    prefetches: int  # prefetch_slots: copied ahead of the step that needs it
    host_evictions: int
    slot_evictions: int
    host_resident: int
    host_bytes: int
    slots_in_use: int
    slots_pinned: int
    slots_total: int
    loading: int
    registered: int
