"""Keeping a long-lived process's startup objects out of the garbage collector's way.

A process that imports torch, transformers and mixserve and builds a model holds ~300k-360k
objects that live until it exits. Python's collector walks all of them at every full
collection, and serving allocates enough short-lived containers (tensors, tuples, request
state) to trigger one every ~10 s: measured in an offline run of bench/serving_throughput.py's
workload (2 vCPUs), 7 full collections of ~100 ms each on the engine thread, each a stall of
every running request. `gc.freeze()` moves the objects alive at that moment out of the
collector's generations; later garbage is collected as before.

Only for processes that keep what they built until they exit (the server, the adapter load
workers): a frozen object in a reference cycle is never collected, so a library caller that
builds and drops engines (tests, notebooks) must not freeze for good. `mixserve.LLM` freezes
for the length of one call instead (`frozen_while_running`): its engine's steps never walk the
caller's objects, and whatever became garbage meanwhile is collected after.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


def freeze_startup_objects() -> int:
    """Collect once (so no garbage is frozen), then freeze every object alive now; returns
    how many objects the collector will no longer walk."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.info("%d startup objects frozen out of garbage collection", frozen)
    return frozen


@contextmanager
def frozen_while_running() -> Iterator[bool]:
    """Keeps every object alive at entry out of collections until exit, then hands them back
    to the collector's oldest generation (garbage among them is collected later, not kept).
    Yields whether it froze: it does nothing where objects are frozen already (a server
    process, a caller's own freeze), as its unfreeze would undo theirs."""
    if gc.get_freeze_count():
        yield False
        return
    gc.freeze()
    try:
        yield True
    finally:
        gc.unfreeze()
