"""Per-request timing record, filled by the API as a response streams (no prometheus here)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    """Times are time.monotonic() seconds."""

    adapter: str | None
    prompt_tokens: int
    start: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    inter_token: list[float] = field(default_factory=list)
    generation_tokens: int = 0

    def on_tokens(self, count: int, now: float | None = None) -> None:
        """count new tokens arrived together (one delta) at `now`."""
        if count <= 0:
            return
        now = time.monotonic() if now is None else now
        if self.first_token is None:
            self.first_token = now
        elif self.last_token is not None:
            self.inter_token.append(now - self.last_token)
        self.last_token = now
        self.generation_tokens += count
