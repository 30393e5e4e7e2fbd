"""bench/adapter_load.py runs end to end (one repeat) and writes every variant."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.bench_runs import run_bench


@pytest.mark.smollm2
def test_adapter_load_bench_writes_every_variant(tmp_path: Path, smollm2_dir: str) -> None:
    out = tmp_path / "adapter_load.json"
    record, stdout = run_bench("adapter_load.py", ["--repeats", "1"], out, timeout_s=300)
    assert set(record["median_ms"]) == {
        "torch.load mmap=False",
        "torch.load mmap=True",
        "load_adapter in-process",
        "load_adapter through a worker",
    }
    assert all(ms > 0 for ms in record["median_ms"].values())
    assert 20 < record["file_mb"] < 40
    assert "load_adapter through a worker" in stdout
