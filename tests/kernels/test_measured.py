"""kernels._measured.fastest: the first call per key times the candidates, later calls reuse the
winner; every call returns the chosen candidate's own result."""

from __future__ import annotations

import time

from mixserve.kernels._measured import chosen, fastest


def test_the_faster_candidate_is_chosen_once_per_key():
    calls = {"slow": 0, "fast": 0}

    def slow() -> str:
        calls["slow"] += 1
        time.sleep(0.005)
        return "slow"

    def fast() -> str:
        calls["fast"] += 1
        return "fast"

    key = ("test", "slow-first")
    assert chosen(key) is None
    assert fastest(key, (slow, fast)) == "fast"
    assert chosen(key) == 1
    timed_slow = calls["slow"]
    assert timed_slow >= 2  # warm-up and timed runs
    for _ in range(3):
        assert fastest(key, (slow, fast)) == "fast"
    assert calls["slow"] == timed_slow  # the loser never runs again
    # Another key measures afresh (here the fast one comes first).
    assert fastest(("test", "fast-first"), (fast, slow)) == "fast"
    assert chosen(("test", "fast-first")) == 0
