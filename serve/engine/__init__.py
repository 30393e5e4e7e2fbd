"""The engine: the step loop (EngineCore) and its threaded asyncio front (EngineClient)."""

from __future__ import annotations

from mixserve.engine.client import EngineClient, EngineDeadError, EngineShuttingDownError
from mixserve.engine.core import EngineCore, EngineStats, StepReport

__all__ = [
    "EngineClient",
    "EngineCore",
    "EngineDeadError",
    "EngineShuttingDownError",
    "EngineStats",
    "StepReport",
]
