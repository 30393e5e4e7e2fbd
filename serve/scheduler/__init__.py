"""Continuous batching and KV block accounting (pure Python, no torch)."""

from __future__ import annotations

from mixserve.scheduler.block_manager import BlockManager
from mixserve.scheduler.requests import SchedulerStats
from mixserve.scheduler.scheduler import Scheduler
from mixserve.scheduler.sequence import Request, Sequence, SequenceStatus

__all__ = ["BlockManager", "Request", "Scheduler", "SchedulerStats", "Sequence", "SequenceStatus"]
