"""Helpers for the load worker tests: weights compared tensor by tensor, a stopped worker."""

from __future__ import annotations

import os
import signal

import torch

from mixserve.adapters import AdapterWeights
from mixserve.adapters.process_loader import ProcessLoader, _Worker


def assert_same_weights(got: AdapterWeights, want: AdapterWeights) -> None:
    assert got.spec == want.spec and got.files == want.files
    assert got.sites.keys() == want.sites.keys()
    for proj, site in want.sites.items():
        other = got.sites[proj]
        assert other.kind == site.kind, proj
        for field in ("lora_a", "lora_b", "scale", "router"):
            a, b = getattr(other, field), getattr(site, field)
            assert (a is None) == (b is None), (proj, field)
            if b is not None:
                assert a.shape == b.shape and torch.equal(a, b), (proj, field)
    assert (got.ffn_router is None) == (want.ffn_router is None)
    if want.ffn_router is not None:
        assert torch.equal(got.ffn_router, want.ffn_router)


def stopped_worker(loader: ProcessLoader, *, ready: bool) -> _Worker:
    """The loader's one worker, started (and READY, if asked) and then stopped: it never
    replies again."""
    loader.start()
    if ready:
        loader.wait_until_ready(timeout_s=120)  # its start is not what the test times out
    (worker,) = loader._workers
    os.kill(worker.proc.pid, signal.SIGSTOP)
    return worker
