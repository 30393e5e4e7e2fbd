"""Pick, by measuring on this machine, the fastest of equivalent ways to compute one thing.

CPU GEMM libraries choose different code paths for the same math in different operand layouts,
and which one wins changes with the processor: for a slot's [E*R, H] LoRA A against its few rows,
`A @ x^T` ran faster on an AMD EPYC VM and `x @ A^T` 2.5x faster on an Intel Xeon VM (2026-12).
A constant picked on one machine is wrong on the other, so the first call of each shape times
every candidate on its real operands and later calls reuse the winner.

Candidates compute the same function; they may differ in floating-point rounding only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")

_TIMED_RUNS = 3
_choices: dict[Hashable, int] = {}


def fastest(key: Hashable, candidates: Sequence[Callable[[], T]]) -> T:
    """Result of the candidate measured fastest for key (timed on the first call per key:
    each candidate runs once to warm up, then _TIMED_RUNS times; the best run counts)."""
    choice = _choices.get(key)
    if choice is not None:
        return candidates[choice]()
    best_seconds, result = float("inf"), None
    for index, candidate in enumerate(candidates):
        out = candidate()
        seconds = float("inf")
        for _ in range(_TIMED_RUNS):
            start = time.perf_counter()
            out = candidate()
            seconds = min(seconds, time.perf_counter() - start)
        if seconds < best_seconds:
            best_seconds, result, choice = seconds, out, index
    assert choice is not None, "no candidates"
    _choices[key] = choice
    return result  # type: ignore[return-value]


def chosen(key: Hashable) -> int | None:
    """The candidate index picked for key, or None before its first call (tests)."""
    return _choices.get(key)
