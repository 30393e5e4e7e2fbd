"""Seeded random add / abort / step on the real engine: block AND slot accounting every step."""

from __future__ import annotations

import random

import pytest
from engine_support import engine, make_adapters, make_model

from mixserve.types import SamplingParams


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("stress"))
    return make_model(root), make_adapters(root, 12)


@pytest.mark.parametrize("seed", range(3))
def test_random_interleaving_keeps_blocks_and_slots_exact(setup, seed):
    model_dir, adapters = setup
    rng = random.Random(seed)
    built = engine(
        model_dir,
        adapters,
        slots=3,
        num_blocks=rng.choice([40, 80]),
        block_size=rng.choice([2, 4]),
        max_seqs=rng.randint(2, 8),
        budget=rng.randint(8, 40),
    )
    core = built.core
    names = [None, *adapters]
    live: dict[str, str | None] = {}  # request id -> adapter
    for step in range(120):
        roll = rng.random()
        if roll < 0.35 and len(live) < 10:
            rid = f"r{step}"
            adapter = rng.choice(names)
            params = SamplingParams(
                temperature=rng.choice([0.0, 1.0]),
                seed=rng.randint(0, 9),
                n=rng.choice([1, 1, 2]),
                max_tokens=rng.randint(1, 8),
            )
            prompt = [rng.randint(2, 250) for _ in range(rng.randint(1, 16))]
            core.add_request(rid, prompt, params, adapter)
            live[rid] = adapter
        elif roll < 0.45 and live:
            rid = rng.choice(sorted(live))
            core.abort(rid)
            live.pop(rid)
        core.step()
        for request in list(live):
            if request not in core.scheduler.requests:
                live.pop(request)  # finished
        _check(core, live)
    while core.has_work:  # liveness: what is left finishes
        core.step()
        if not core.last_step_ran:
            core.wait_for_progress(0.05)
    live.clear()
    _check(core, live)
    blocks = core.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks


def _check(core, live: dict[str, str | None]) -> None:
    core.scheduler.blocks.check_invariants()
    pager = core.pager
    assert pager.stats().slots_pinned == 0, "a slot stayed pinned after its step"
    for name in pager.sources():
        expected = sum(1 for adapter in live.values() if adapter == name)
        assert pager.in_flight(name) == expected, name
