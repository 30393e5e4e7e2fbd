"""bench/serving_steps.py runs end to end on a tiny workload and its step split adds up."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.bench_runs import run_bench


@pytest.mark.smollm2
def test_serving_steps_bench_splits_every_step(tmp_path: Path, smollm2_dir: str) -> None:
    out = tmp_path / "steps.json"
    args = ["--requests", "4", "--adapters", "2", "--max-tokens", "3", "--slots", "2"]
    results = run_bench("serving_steps.py", args, out)[0]["results"]
    assert results.keys() == {"base", "uniform", "zipf", "uniform_warm", "zipf_warm"}
    for variant, r in results.items():
        steps = r["steps"]
        assert r["tokens"] == 4 * 3, variant
        assert r["prefill"]["steps"] + r["decode"]["steps"] == len(steps), variant
        seconds = sum(s["seconds"] for s in steps)
        assert r["prefill"]["seconds"] + r["decode"]["seconds"] == pytest.approx(seconds)
        assert sum(s["num_prompt_tokens"] for s in steps) > 0, variant
        assert all(s["num_adapters"] == 0 for s in steps) == (variant == "base"), variant
    # Warm: every adapter is in the host tier before the run, so no step waits on a load.
    assert results["uniform_warm"]["with_loads"]["steps"] == 0
    assert results["zipf_warm"]["with_loads"]["steps"] == 0
