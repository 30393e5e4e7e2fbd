"""Scheduler rules on CPU with a fake runner (no model)."""

from __future__ import annotations

import pytest
from fake_runner import FakeRunner, next_token

from mixserve.config import SchedulerConfig
from mixserve.scheduler import BlockManager, Scheduler
from mixserve.types import FinishReason, SamplingParams

EOS = 96


def make(num_blocks=64, block_size=4, max_seqs=8, budget=32, slots=4, caching=True, bypass=64):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    sched = Scheduler(
        SchedulerConfig(
            max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_adapter_bypass=bypass
        ),
        bm,
        max_adapters_per_step=slots,
        eos_token_ids=frozenset({EOS}),
        max_model_len=512,
    )
    return sched, FakeRunner(block_size)


def run(sched, runner, ready=lambda _: True, max_steps=1000):
    outputs: dict[tuple[str, int], list[int]] = {}
    reasons = {}
    for _ in range(max_steps):
        if not sched.has_unfinished:
            break
        plan = sched.schedule(ready)
        for delta in sched.update(plan, runner.execute(plan)):
            outputs.setdefault((delta.request_id, delta.index), []).extend(delta.token_ids)
            if delta.finished:
                reasons[(delta.request_id, delta.index)] = delta.finish_reason
        sched.blocks.check_invariants()
    assert not sched.has_unfinished
    return outputs, reasons


def expected(prompt, max_tokens, index=0, eos=EOS):
    tokens, out = list(prompt), []
    for _ in range(max_tokens):
        t = next_token(tokens, index if not out else 0)
        out.append(t)
        tokens.append(t)
        if t == eos:
            break
    return out


GREEDY = SamplingParams(temperature=0, max_tokens=6)


def test_outputs_follow_the_fake_model_and_budget_is_respected():
    sched, runner = make(budget=10)
    prompts = {f"r{i}": list(range(i, i + 3 + 4 * i)) for i in range(5)}
    for rid, prompt in prompts.items():
        sched.add_request(rid, prompt, GREEDY)
    outputs, reasons = run(sched, runner)
    for rid, prompt in prompts.items():
        assert outputs[(rid, 0)] == expected(prompt, 6)
    assert all(p.num_tokens <= 10 for p in runner.steps)
    # chunked prefill: a 19-token prompt cannot fit one 10-token step
    assert any(not s.sample for p in runner.steps for s in p.sequences)
    # prefill chunks and decode tokens share steps
    assert any(
        any(len(s.token_ids) == 1 and s.num_output_tokens > 0 for s in p.sequences)
        and any(len(s.token_ids) > 1 for s in p.sequences)
        for p in runner.steps
    )
    assert set(reasons.values()) <= {FinishReason.LENGTH, FinishReason.STOP}


def test_running_sequence_cap():
    sched, runner = make(max_seqs=2)
    for i in range(5):
        sched.add_request(f"r{i}", [i + 1, i + 2], GREEDY)
    run(sched, runner)
    assert max(len(p.sequences) for p in runner.steps) <= 2


@pytest.mark.parametrize(
    ("bypass", "first_ids"),
    [
        (0, {"r0", "r1"}),  # strict FCFS: nothing passes r2 ("c"), held back by the cap
        (1, {"r0", "r1", "r3"}),  # r3 shares "a" with the step and may pass r2, once
        (64, {"r0", "r1", "r3", "r4"}),  # the base request r4 fits any step; "d" does not
    ],
)
def test_adapter_cap_per_step_and_bounded_bypass(bypass, first_ids):
    sched, runner = make(slots=2, bypass=bypass)
    for i, adapter in enumerate(["a", "b", "c", "a", None, "d"]):
        sched.add_request(f"r{i}", [i + 1] * 5, GREEDY, adapter, (adapter, 1))
    outputs, _ = run(sched, runner)
    for plan in runner.steps:
        assert len({s.adapter for s in plan.sequences} - {None}) <= 2
    assert {f"r{s.seq_id}" for s in runner.steps[0].sequences} == first_ids  # ids follow arrival
    for i in range(6):
        assert outputs[(f"r{i}", 0)] == expected([i + 1] * 5, 6)


def test_held_back_request_is_not_starved_by_a_stream_of_resident_adapters():
    """Requests for the two resident adapters keep arriving every step; the request for a third
    adapter is passed at most `bypass` times, then admission waits for it."""
    bypass = 3
    sched, runner = make(slots=2, max_seqs=16, bypass=bypass)
    sched.add_request("a0", [1] * 3, GREEDY, "a", ("a", 1))
    sched.add_request("b0", [2] * 3, GREEDY, "b", ("b", 1))
    sched.add_request("c0", [3] * 3, GREEDY, "c", ("c", 1))
    admitted_before_c = 0
    for step in range(200):
        for adapter in "ab":
            sched.add_request(f"{adapter}{step + 1}", [4] * 3, GREEDY, adapter, (adapter, 1))
        plan = sched.schedule()
        ids = {sched.request_id_of(s.seq_id) for s in plan.sequences if s.num_computed_tokens == 0}
        if "c0" in ids:
            break
        admitted_before_c += len(ids - {"a0", "b0"})
        sched.update(plan, runner.execute(plan))
        sched.blocks.check_invariants()
    else:
        pytest.fail("the request for adapter c was starved")
    assert admitted_before_c == bypass


def test_loading_adapter_waits_without_holding_up_others():
    sched, runner = make()
    loaded = {"fast"}
    sched.add_request("slow", [1, 2, 3], GREEDY, "slow", ("slow", 1))
    sched.add_request("fast", [4, 5, 6], GREEDY, "fast", ("fast", 1))
    plan = sched.schedule(lambda name: name in loaded)
    assert {s.adapter for s in plan.sequences} == {"fast"}
    sched.update(plan, runner.execute(plan))
    loaded.add("slow")
    outputs, _ = run(sched, runner, lambda name: name in loaded)
    assert outputs[("slow", 0)] == expected([1, 2, 3], 6)


def test_next_admission_adapters_are_those_the_running_cap_lets_in():
    sched, runner = make(max_seqs=3)
    for rid, adapter in [("r0", "a"), ("r1", None), ("r2", "a"), ("r3", "b"), ("r4", "c")]:
        key = None if adapter is None else (adapter, 1)
        sched.add_request(rid, [1, 2, 3], GREEDY, adapter, key)
    assert sched.next_admission_adapters() == ["a"]  # r0..r2: three seats
    plan = sched.schedule(lambda name: name != "a")  # a is loading: r1, r3 and r4 run
    assert {s.adapter for s in plan.sequences} == {None, "b", "c"}
    assert sched.next_admission_adapters() == []  # no seat: nothing waits on a's load yet
    sched.update(plan, runner.execute(plan))
    outputs, _ = run(sched, runner)
    assert sched.next_admission_adapters() == []
    assert set(outputs) == {(f"r{i}", 0) for i in range(5)}


def test_preemption_recomputes_and_gives_the_same_outputs():
    prompts = {f"r{i}": [i + 1] * (6 + i) for i in range(6)}
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    roomy, runner = make(num_blocks=200)
    for rid, p in prompts.items():
        roomy.add_request(rid, p, params)
    want, _ = run(roomy, runner)
    tight, runner = make(num_blocks=14)
    for rid, p in prompts.items():
        tight.add_request(rid, p, params)
    got, _ = run(tight, runner)
    assert tight.num_preemptions > 0
    assert got == want


def test_abort_frees_everything_at_any_stage():
    sched, runner = make(budget=6)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    sched.add_request("waiting", [1] * 30, params)
    sched.add_request("prefill", [2] * 12, params)
    sched.add_request("decode", [3] * 2, params)
    assert sched.abort("nope") == []
    before = sched.abort("waiting")
    assert [d.finish_reason for d in before] == [FinishReason.ABORT]
    for _ in range(3):
        plan = sched.schedule()
        sched.update(plan, runner.execute(plan))
    deltas = sched.abort("prefill") + sched.abort("decode")
    assert {d.finish_reason for d in deltas} == {FinishReason.ABORT}
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks
    assert not sched.running and not sched.waiting and not sched.has_unfinished
    assert {r.request_id for r in sched.drain_finished()} == {"waiting", "prefill", "decode"}
    sched.blocks.check_invariants()


def test_n_completions_share_the_prompt_and_differ():
    sched, runner = make()
    params = SamplingParams(temperature=0.8, n=3, max_tokens=4, ignore_eos=True)
    prompt = [5, 6, 7, 8, 9, 10]  # 6 tokens: a partial last block to copy on fork
    sched.add_request("r", prompt, params)
    outputs, _ = run(sched, runner)
    assert sorted(outputs) == [("r", 0), ("r", 1), ("r", 2)]
    firsts = {outputs[("r", i)][0] for i in range(3)}
    assert firsts == {next_token(prompt, i) for i in range(3)}
    copies = [c for p in runner.steps for c in p.block_copies]
    assert len(copies) == 2  # one partial block per extra completion
    prompt_steps = [p for p in runner.steps if any(s.num_output_tokens == 0 for s in p.sequences)]
    assert len(prompt_steps) == 1  # the prompt was computed once
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks


def test_prefix_cache_hits_are_counted_and_separate_adapters():
    sched, runner = make()
    prompt = list(range(1, 18))
    sched.add_request("a1", prompt, GREEDY, "a", ("a", 1))
    run(sched, runner)
    sched.add_request("a2", prompt, GREEDY, "a", ("a", 1))
    sched.add_request("b1", prompt, GREEDY, "b", ("b", 1))
    outputs, _ = run(sched, runner)
    stats = sched.stats()
    assert stats.prefix_hit_tokens == 16  # a2 hits 4 blocks; b1 hits none
    assert outputs[("a2", 0)] == outputs[("b1", 0)] == expected(prompt, 6)


def test_finish_reasons():
    sched, runner = make()
    prompt = [1, 2, 3]
    first = expected(prompt, 3)
    sched.add_request(
        "stop", prompt, SamplingParams(temperature=0, max_tokens=9, stop_token_ids=(first[1],))
    )
    sched.add_request("len", prompt, SamplingParams(temperature=0, max_tokens=2))
    outputs, reasons = run(sched, runner)
    assert outputs[("stop", 0)] == first[:2] and reasons[("stop", 0)] is FinishReason.STOP
    assert len(outputs[("len", 0)]) == 2 and reasons[("len", 0)] is FinishReason.LENGTH


def test_bad_requests():
    sched, _ = make(num_blocks=4)
    with pytest.raises(ValueError, match="empty prompt"):
        sched.add_request("a", [], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request("b", [1] * 510, GREEDY)
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add_request("c", [1] * 14, GREEDY)
    sched.add_request("d", [1], GREEDY)
    with pytest.raises(ValueError, match="already"):
        sched.add_request("d", [1], GREEDY)
