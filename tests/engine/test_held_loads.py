"""A CPU engine holds an adapter load until a request can use it next, or a step ran decode only
(EngineCore._start_due_loads)."""

from __future__ import annotations

from engine_support import engine, make_adapters, make_model

from mixserve.types import FinishReason, SamplingParams


def test_a_load_waits_for_a_seat_or_a_decode_step(tmp_path):
    root = str(tmp_path)
    adapters = make_adapters(root, 2)
    built = engine(make_model(root), adapters, max_seqs=1, budget=8)
    core = built.core
    assert core.hold_ahead_loads and core.pager is not None
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    first, second = adapters
    core.add_request("r0", list(range(2, 14)), params, first)  # 12 prompt tokens: two steps
    core.add_request("r1", list(range(20, 26)), params, second)
    assert core.pager.num_loads_held == 2

    steps = []  # (ran, prompt tokens, loads still held after the step)
    finished = {}
    while core.has_work:
        for delta in core.step():
            if delta.finished:
                finished[delta.request_id] = delta.finish_reason
        report = core.last_report
        steps.append((report.ran, report.num_prompt_tokens, core.pager.num_loads_held))
        if not core.last_step_ran:
            core.pager.wait(0.05)
        assert len(steps) < 1000

    assert finished == {"r0": FinishReason.LENGTH, "r1": FinishReason.LENGTH}
    # The first step starts r0's load only (one seat); r1's waits through r0's prefill steps...
    first_decode = next(i for i, (ran, prompt, _) in enumerate(steps) if ran and not prompt)
    assert all(held == 1 for _, _, held in steps[: first_decode + 1])
    assert [prompt for ran, prompt, _ in steps[: first_decode + 1] if ran] == [8, 4, 0]
    # ...and starts at the step after r0's first decode-only step.
    assert steps[first_decode + 1][2] == 0


def test_an_idle_engine_starts_its_held_loads(tmp_path):
    root = str(tmp_path)
    adapters = make_adapters(root, 1)
    core = engine(make_model(root), adapters).core
    assert core.pager is not None
    name = next(iter(adapters))
    core.pager.acquire(name, hold=True)  # held, and no request to start it for
    core.step()
    assert not core.last_step_ran
    assert core.pager.num_loads_held == 0
    assert core.pager.wait(60)
    core.pager.release(name)
