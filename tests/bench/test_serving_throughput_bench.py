"""bench/serving_throughput.py runs end to end on a tiny workload, in two rounds with the warm
variants, and reports each variant's median and its per-round ratios to that round's base."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from support.bench_runs import run_bench


@pytest.mark.smollm2
def test_serving_bench_reports_medians_of_rounds(tmp_path: Path, smollm2_dir: str) -> None:
    out = tmp_path / "serving.json"
    args = ["--requests", "4", "--adapters", "2", "--max-tokens", "2", "--rounds", "2", "--warm"]
    record, stdout = run_bench("serving_throughput.py", [*args, "--skip-package"], out)
    results = record["results"]
    assert len(results["rounds"]) == 2
    for variant in ("base", "uniform", "zipf", "uniform_warm", "zipf_warm"):
        r = results[variant]
        assert r["tokens"] == 4 * 2
        assert r["tokens_per_s"] == statistics.median(r["tokens_per_s_rounds"])
        bases = [round_["base"]["tokens_per_s"] for round_ in results["rounds"]]
        want = [t / b for t, b in zip(r["tokens_per_s_rounds"], bases, strict=True)]
        assert r["vs_base_rounds"] == pytest.approx(want)
        assert r["vs_base"] == pytest.approx(statistics.median(want))
    assert results["base"]["vs_base"] == 1.0
    # Warm runs read nothing from disk during the run; cold ones load each adapter they use.
    assert results["uniform_warm"]["disk_loads"] == 0
    assert results["uniform"]["disk_loads"] == results["uniform"]["distinct_adapters"]
    assert "medians of 2 rounds" in stdout
