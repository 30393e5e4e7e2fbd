"""Torch intra-op threads on the threads mixserve starts besides the caller's.

Torch's CPU build runs its parallel ops on libgomp. libgomp gives every thread that enters a
parallel region its own team of helpers. Once all teams together hold more threads than there
are CPUs, it throttles spin-waiting for every team, the engine's too: each parallel op then waits
on futex wake-ups, and small ops cost several times more.

Measured on 2 cores: one parallel copy on a worker thread made every later decode step ~30%
slower, and the LoRA site ops 2x slower, for as long as the worker lived. So helper threads
(adapter loads) run torch single-threaded.

`torch.set_num_threads` also sets the count that threads started later begin with, and torch
applies that default on a thread's first parallel op unless the thread has already been
initialised. So each thread here first lets torch initialise it (`torch.get_num_threads` does),
then sets its own count: the engine thread keeps its creator's count whatever a helper set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def single_threaded_torch() -> None:
    """Initializer for helper threads: their torch ops never start an OpenMP team."""
    _set_after_init(1)


def set_torch_threads(num_threads: int) -> None:
    """On a compute thread: use num_threads intra-op threads (the creator's count, captured
    before the thread started)."""
    _set_after_init(num_threads)


def _set_after_init(num_threads: int) -> None:
    torch.get_num_threads()  # torch's once-per-thread init, which would reset a count set earlier
    torch.set_num_threads(num_threads)


class ComputeThreadBudget:
    """Lowers the stepping thread's torch thread count while adapter loads keep CPUs busy.

    Each running load occupies one CPU (its worker runs single-threaded). If the step's team
    kept all its threads, the cores would be oversubscribed, and an OpenMP team with a
    descheduled member waits for it at every barrier. So a step runs with at most
    `cpus - busy` threads (at least 1), and the thread's own count is restored after it.
    """

    def __init__(self, num_cpus: int | None = None) -> None:
        self.num_cpus = num_cpus or available_cpus()

    def threads_for(self, num_threads: int, num_busy: int) -> int:
        return max(1, min(num_threads, self.num_cpus - num_busy))

    @contextmanager
    def sharing_with(self, num_busy: int) -> Iterator[int]:
        """Runs the block with the thread count for num_busy busy CPUs; yields that count."""
        with self.following(lambda: num_busy) as refresh:
            yield refresh()

    @contextmanager
    def following(self, num_busy: Callable[[], int]) -> Iterator[Callable[[], int]]:
        """Runs the block with the thread count for num_busy() busy CPUs, read at entry and
        again at each call of the yielded refresh (which returns the count it set): a step
        calls it between layers, so a load that ends mid-step gives its CPU back at the next
        layer, not at the next step (a prefill step takes seconds on 2 vCPUs), and one that
        starts takes it. The thread's own count is restored after the block."""
        own = torch.get_num_threads()
        current = own

        def refresh() -> int:
            nonlocal current
            wanted = self.threads_for(own, num_busy())
            if wanted != current:
                torch.set_num_threads(wanted)
                current = wanted
            return current

        refresh()
        try:
            yield refresh
        finally:
            if current != own:
                torch.set_num_threads(own)
