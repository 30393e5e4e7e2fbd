"""Seeded random interleavings of add / abort / step: accounting invariants after every step."""

from __future__ import annotations

import random

import pytest
from fake_runner import FakeRunner

from mixserve.config import SchedulerConfig
from mixserve.scheduler import BlockManager, Scheduler
from mixserve.types import SamplingParams


@pytest.mark.parametrize("seed", range(12))
def test_random_interleaving_keeps_accounting_exact(seed):
    rng = random.Random(seed)
    slots = rng.randint(1, 3)
    bm = BlockManager(rng.randint(12, 40), rng.choice([1, 2, 4]))
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=rng.randint(1, 6), max_num_batched_tokens=rng.randint(4, 24)),
        bm,
        max_adapters_per_step=slots,
        eos_token_ids=frozenset({0}),
        max_model_len=64,
    )
    runner = FakeRunner(bm.block_size)
    adapters = [None, "a", "b", "c", "d"]
    ready = {a for a in adapters if a is not None and rng.random() < 0.7}
    live: set[str] = set()
    finished: set[str] = set()
    for step in range(300):
        action = rng.random()
        if action < 0.3 and len(live) < 12:
            rid = f"r{step}"
            adapter = rng.choice(adapters)
            params = SamplingParams(
                temperature=1.0,
                seed=rng.randint(0, 9),
                n=rng.choice([1, 1, 2]),
                max_tokens=rng.randint(1, 10),
            )
            prompt = [rng.randint(1, 90) for _ in range(rng.randint(1, 12))]
            total = len(prompt) + params.max_tokens
            if bm.blocks_needed(total) > bm.num_blocks:
                with pytest.raises(ValueError, match="KV blocks"):
                    sched.add_request(rid, prompt, params, adapter, (adapter, 1))
                continue
            sched.add_request(rid, prompt, params, adapter, (adapter, 1))
            live.add(rid)
        elif action < 0.4 and live:
            rid = rng.choice(sorted(live))
            sched.abort(rid)
        elif action < 0.45:
            ready.add(rng.choice(adapters[1:]))
        plan = sched.schedule(lambda name: name in ready)
        assert len({s.adapter for s in plan.sequences} - {None}) <= slots
        assert plan.num_tokens <= sched.config.max_num_batched_tokens
        assert len(sched.running) <= sched.config.max_num_seqs
        assert not (set(map(id, sched.running)) & set(map(id, sched.waiting)))
        sched.update(plan, runner.execute(plan))
        bm.check_invariants()
        for request in sched.drain_finished():
            assert request.request_id not in finished, "finished twice"
            finished.add(request.request_id)
            live.discard(request.request_id)
    # Liveness: with every adapter loaded and no new work, everything left must finish.
    ready.update(a for a in adapters if a is not None)
    for _ in range(2000):
        if not sched.has_unfinished:
            break
        plan = sched.schedule(lambda name: name in ready)
        sched.update(plan, runner.execute(plan))
        bm.check_invariants()
    for request in sched.drain_finished():
        finished.add(request.request_id)
        live.discard(request.request_id)
    assert not live, f"never finished: {sorted(live)}"
    assert not sched.has_unfinished and not sched.running and not sched.waiting
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants()
