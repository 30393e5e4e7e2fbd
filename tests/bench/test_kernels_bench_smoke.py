"""bench/kernels on CPU: --smoke runs the Triton kernels in the interpreter, passes the
cross-checks (MoE-LoRA FFN against the MoE-PEFT loop, paged attention against the reference) and
writes a row per case; a full-size CPU run is refused; a baseline that disagrees fails the run.
Each case runs a script in a subprocess (the interpreter is chosen before triton is imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "kernels"
SCRIPT = BENCH / "moe_lora_layer.py"
ATTENTION = BENCH / "paged_attention.py"


def _run(args: list[str], kernels: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "MIXSERVE_KERNELS": kernels}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_smoke_on_cpu_with_triton_interpreter(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    proc = _run([str(SCRIPT), "--smoke", "--device", "cpu", "--out", str(out)], "triton")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| decode | 8 |" in proc.stdout and "MoE-PEFT loop" in proc.stdout
    record = json.loads(out.read_text())
    assert record["kernels"] == "triton"
    assert record["cross_check"]["passed"] is True
    assert record["targets"]["judged"] is False  # CPU figures are never judged
    rows = record["rows"]
    assert [(r["phase"], r["tokens"]) for r in rows] == [
        ("decode", 1),
        ("decode", 8),
        ("prefill", 32),
    ]
    tolerance = record["cross_check"]["tolerance"]
    for row in rows:
        assert row["assignments"] == 2 * row["tokens"]  # top-2
        assert 0 < row["groups"] <= row["assignments"]
        assert max(row["ffn_rel_err"], row["segment_loop_rel_err"], row["lora_rel_err"]) <= (
            tolerance
        )
        for key in ("lora_eager_ms", "base_ffn_ms", "moe_lora_ffn_ms", "moe_peft_loop_ms"):
            assert row[key] > 0
        assert row["lora_graph_ms"] is None  # CUDA graphs only on CUDA
    assert record["peaks"]["bandwidth_gbps"] > 0 and record["peaks"]["matmul_tflops"] > 0


def test_paged_attention_smoke_on_cpu_with_triton_interpreter(tmp_path: Path) -> None:
    out = tmp_path / "attention.json"
    proc = _run([str(ATTENTION), "--smoke", "--device", "cpu", "--out", str(out)], "triton")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["kernels"] == "triton" and record["cross_check"]["passed"] is True
    rows = record["rows"]
    assert [(r["phase"], r["batch"]) for r in rows] == [
        ("decode", 1),
        ("decode", 3),
        ("prefill", 1),
    ]
    for row in rows:
        assert max(row["rel_err"], row["sdpa_rel_err"]) <= record["cross_check"]["tolerance"]
        assert row["eager_ms"] > 0 and row["reference_ms"] > 0 and row["bytes"] > 0


@pytest.mark.parametrize("script", [SCRIPT, ATTENTION], ids=lambda p: p.stem)
def test_full_size_run_on_cpu_is_refused(tmp_path: Path, script: Path) -> None:
    out = tmp_path / "full.json"
    proc = _run([str(script), "--device", "cpu", "--out", str(out)], "auto")
    assert proc.returncode != 0
    assert "GPU figures come only from a real GPU" in proc.stderr
    assert "--smoke" in proc.stderr
    assert not out.exists()


def test_cross_check_failure_exits_non_zero(tmp_path: Path) -> None:
    """A baseline that computes something else (here: no expert LoRA at all) stops the run."""
    out = tmp_path / "bad.json"
    code = (
        f"import sys; sys.path.insert(0, {str(BENCH)!r}); sys.argv[0] = {str(SCRIPT)!r}\n"
        "import moe_lora_layer, moe_lora_workload\n"
        "moe_lora_layer.moe_peft_ffn = lambda layer, batch, k: "
        "moe_lora_workload.base_ffn(layer, batch.x)\n"
        f"moe_lora_layer.main(['--smoke', '--device', 'cpu', '--out', {str(out)!r}])\n"
    )
    proc = _run(["-c", code], "reference")
    assert proc.returncode != 0
    assert "cross-check failed at decode T=1" in proc.stderr
    assert not out.exists()
