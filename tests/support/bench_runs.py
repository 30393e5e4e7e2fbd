"""Running a bench/ script end to end from a test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, args: list[str], out: Path, timeout_s: int = 600) -> tuple[dict, str]:
    """Runs `bench/<script> *args --out out` from the repository root; asserts it succeeded and
    returns its JSON record and its stdout."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout
