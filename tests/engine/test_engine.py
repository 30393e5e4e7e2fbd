"""The engine end to end on a tiny model with 20 adapters of every family and few slots."""

from __future__ import annotations

import random

import pytest
from engine_support import (
    assert_same_greedy,
    engine,
    finish_of,
    make_adapters,
    make_model,
    run_all,
    tokens_of,
)

from mixserve.types import FinishReason, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("engine"))
    return make_model(root), make_adapters(root, 20)


def _requests(count, adapters, seed=0, max_tokens=8):
    rng = random.Random(seed)
    names = [None, *adapters]
    return [
        (
            f"r{i}",
            [rng.randint(2, 250) for _ in range(rng.randint(1, 24))],
            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
            names[i % len(names)],
        )
        for i in range(count)
    ]


def test_64_requests_over_20_adapters_with_6_slots_equal_each_alone(setup):
    model_dir, adapters = setup
    requests = _requests(64, adapters)
    built = engine(model_dir, adapters, slots=6)
    together = run_all(built.core, requests)
    stats = built.core.stats()
    assert stats.pager.slot_evictions > 0, "slots must be evicted and reloaded mid-run"
    assert stats.pager.slots_total == 6
    alone_engine = engine(model_dir, adapters, slots=2)
    for rid, prompt, params, adapter in requests:
        alone = run_all(alone_engine.core, [(rid, prompt, params, adapter)])
        got, want = tokens_of(together[(rid, 0)]), tokens_of(alone[(rid, 0)])
        assert len(got) == 8
        assert_same_greedy(alone_engine.core, prompt, adapter, got, want)


def test_preemption_gives_the_same_outputs(setup):
    model_dir, adapters = setup
    requests = _requests(12, list(adapters)[:5], seed=1, max_tokens=12)
    roomy = run_all(engine(model_dir, adapters).core, requests)
    tight = engine(model_dir, adapters, num_blocks=24, block_size=2)
    squeezed = run_all(tight.core, requests)
    assert tight.core.stats().scheduler.num_preemptions > 0
    for rid, prompt, _, adapter in requests:
        assert_same_greedy(
            tight.core, prompt, adapter, tokens_of(squeezed[(rid, 0)]), tokens_of(roomy[(rid, 0)])
        )


def test_prefix_cache_hit_equals_miss_and_never_crosses_adapters(setup):
    model_dir, adapters = setup
    built = engine(model_dir, adapters)
    core = built.core
    prompt = list(range(10, 40))
    first = run_all(core, [("a", prompt, GREEDY, "ad1")])
    assert core.stats().scheduler.prefix_hit_tokens == 0
    second = run_all(core, [("b", prompt, GREEDY, "ad1")])
    hits = core.stats().scheduler.prefix_hit_tokens
    assert hits >= 24 and tokens_of(second[("b", 0)]) == tokens_of(first[("a", 0)])
    other = run_all(core, [("c", prompt, GREEDY, "ad3"), ("d", prompt, GREEDY, None)])
    assert core.stats().scheduler.prefix_hit_tokens == hits, "another adapter hit ad1's blocks"
    uncached = run_all(
        engine(model_dir, adapters, caching=False).core, [("c", prompt, GREEDY, "ad3")]
    )
    assert tokens_of(other[("c", 0)]) == tokens_of(uncached[("c", 0)])


def test_abort_at_every_stage_frees_blocks_and_adapter_references(setup):
    model_dir, adapters = setup
    built = engine(model_dir, adapters, budget=8)
    core = built.core
    # ad3 and ad4 loaded before their requests arrive: with the two loads racing, "prefill" (ad3)
    # could run alone and finish its prompt before "decode" (ad4) starts.
    for name in ("ad3", "ad4"):
        core.pager.acquire(name)
    while core.pager.stats().loading:
        assert core.pager.wait(60), "an adapter load did not finish"
        assert all(result.ok for result in core.pager.poll())
    for name in ("ad3", "ad4"):
        core.pager.release(name)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    core.add_request("waiting", list(range(2, 60)), params, "ad2")
    assert [d.finish_reason for d in core.abort("waiting")] == [FinishReason.ABORT]
    core.add_request("decode", [5, 6], params, "ad4")  # first: decodes while the next prefills
    core.add_request("prefill", list(range(2, 40)), params, "ad3")
    for _ in range(200):
        if not core.scheduler.running:
            core.pager.wait(0.05)  # adapter loads still in flight
        core.step()
        running = {s.request.request_id: s for s in core.scheduler.running}
        if "decode" in running and running["decode"].output_token_ids and "prefill" in running:
            break
    assert running["prefill"].num_computed_tokens < 38  # still in its prefill
    core.abort("prefill")
    core.abort("decode")
    assert not core.has_work
    blocks = core.scheduler.blocks
    assert blocks.num_free_blocks == blocks.num_blocks
    blocks.check_invariants()
    for name in ("ad2", "ad3", "ad4"):
        assert core.pager.in_flight(name) == 0
    assert core.pager.stats().slots_pinned == 0


def test_seeded_sampling_does_not_depend_on_the_batch(setup):
    model_dir, adapters = setup
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)
    alone = run_all(engine(model_dir, adapters).core, [("s", [9, 8, 7, 6], seeded, "ad5")])
    crowd = _requests(10, adapters, seed=3) + [("s", [9, 8, 7, 6], seeded, "ad5")]
    together = run_all(engine(model_dir, adapters, slots=3).core, crowd)
    assert tokens_of(together[("s", 0)]) == tokens_of(alone[("s", 0)])


def test_n_completions_are_reproducible_and_distinct(setup):
    model_dir, adapters = setup
    params = SamplingParams(
        n=4, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True, logprobs=2
    )
    runs = [
        run_all(engine(model_dir, adapters).core, [("n", list(range(3, 13)), params, "ad6")])
        for _ in range(2)
    ]
    outs = [[tokens_of(r[("n", i)]) for i in range(4)] for r in runs]
    assert outs[0] == outs[1]
    assert len({tuple(o) for o in outs[0]}) > 1
    deltas = runs[0][("n", 2)]
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert all(len(lp.top) == 2 for d in deltas for lp in d.logprobs)


def test_a_bad_adapter_fails_only_its_requests(setup, tmp_path):
    model_dir, adapters = setup
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}'
    )
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    built = engine(model_dir, {**adapters, "broken": str(broken)})
    out = run_all(
        built.core, [("bad", [1, 2, 3], GREEDY, "broken"), ("good", [1, 2, 3], GREEDY, "ad0")]
    )
    assert finish_of(out[("bad", 0)]) is FinishReason.ERROR
    assert "broken" in out[("bad", 0)][-1].error and "safetensors" in out[("bad", 0)][-1].error
    assert finish_of(out[("good", 0)]) is FinishReason.LENGTH


def test_unknown_adapter_and_bad_prompts_are_refused(setup):
    model_dir, adapters = setup
    core = engine(model_dir, adapters).core
    from mixserve.adapters import AdapterNotFoundError

    with pytest.raises(AdapterNotFoundError):
        core.add_request("x", [1], GREEDY, "nope")
    with pytest.raises(ValueError, match="token ids"):
        core.add_request("y", [999], GREEDY)
    with pytest.raises(ValueError, match="empty"):
        core.add_request("z", [], GREEDY, "ad1")
    assert core.pager.in_flight("ad1") == 0  # a refused request holds no reference


def test_a_finished_load_goes_into_a_free_slot_before_its_first_step(setup):
    """The step after a load finishes copies it into a free slot (prefetch), so the request's
    first step finds it there; on CPU the slot is then its only copy (exclusive tiers)."""
    model_dir, adapters = setup
    core = engine(model_dir, adapters).core
    run_all(core, [("r0", [5, 6, 7], GREEDY, "ad0"), ("r1", [8, 9], GREEDY, "ad1")])
    stats = core.pager.stats()
    assert (stats.prefetches, stats.host_hits, stats.disk_loads) == (2, 0, 2)
    assert stats.slot_hits >= 2 and stats.host_resident == 0 and stats.slots_in_use == 2


def test_a_failed_placement_of_new_loads_fails_nothing(setup, monkeypatch, caplog):
    """Placing finished loads in free slots is an optimisation: if it raises, the error is
    logged and the requests run (their step's prepare places the adapters)."""
    model_dir, adapters = setup
    core = engine(model_dir, adapters).core

    def broken(*args: object, **kwargs: object) -> dict[str, int]:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(core.pager, "prefetch_slots", broken)
    with caplog.at_level("ERROR", logger="mixserve.engine.core"):
        out = run_all(core, [("r0", [5, 6, 7], GREEDY, "ad0")])
    assert len(tokens_of(out[("r0", 0)])) == GREEDY.max_tokens
    assert "placing newly loaded adapters ['ad0']" in caplog.text
    assert core.pager.stats().host_hits == 1  # placed by the step's prepare
