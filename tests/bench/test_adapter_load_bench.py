"""bench/adapter_load.py runs end to end (one repeat) and writes every variant."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.smollm2
def test_adapter_load_bench_writes_every_variant(tmp_path: Path, smollm2_dir: str) -> None:
    out = tmp_path / "adapter_load.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "adapter_load.py"),
            "--repeats",
            "1",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert set(record["median_ms"]) == {
        "torch.load mmap=False",
        "torch.load mmap=True",
        "load_adapter in-process",
        "load_adapter through a worker",
    }
    assert all(ms > 0 for ms in record["median_ms"].values())
    assert 20 < record["file_mb"] < 40
    assert "load_adapter through a worker" in proc.stdout
