"""EngineCore.last_report describes the step that just ran: its prompt and decode work, its
adapters, the loads beside it and its time."""

from __future__ import annotations

from engine_support import engine, make_adapters, make_model
from support.pager_helpers import settle

from mixserve.types import SamplingParams


def test_step_reports_count_prompt_positions_sequences_and_adapters(tmp_path):
    root = str(tmp_path)
    adapters = make_adapters(root, 2)
    built = engine(make_model(root), adapters, budget=8)
    core = built.core
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    prompts = {"r0": list(range(2, 14)), "r1": list(range(20, 25)), "r2": [7, 8, 9]}
    names = dict(zip(prompts, [*adapters, None], strict=False))
    for rid, prompt in prompts.items():
        core.add_request(rid, prompt, params, names[rid])
    # Both adapters in memory before the first step: which steps hold both must not depend on
    # how fast a load is against r0's five steps (r0 alone fills the first step's budget).
    assert core.pager is not None
    settle(core.pager)
    reports = []
    for _ in range(200):
        if not core.has_work:
            break
        if core.pager is not None and not core.scheduler.running:
            core.pager.wait(0.05)
        core.step()
        if core.last_report.ran:
            reports.append(core.last_report)
    assert not core.has_work
    # Every prompt position is computed once (no cache hits across these prompts), and each
    # report's prompt positions fit its budget of scheduled tokens.
    assert sum(r.num_prompt_tokens for r in reports) == sum(map(len, prompts.values()))
    assert all(r.num_prompt_tokens <= r.num_scheduled_tokens <= 8 for r in reports)
    # Decode-only steps: one token per running sequence.
    decodes = [r for r in reports if r.num_prompt_tokens == 0]
    assert decodes and all(r.num_scheduled_tokens == r.num_sequences for r in decodes)
    assert max(r.num_adapters for r in reports) == 2
    assert all(r.num_adapters <= r.num_sequences <= 3 for r in reports)
    assert all(r.seconds > 0 for r in reports)
    assert core.num_prompt_tokens == sum(r.num_prompt_tokens for r in reports)
