"""Triton kernel tests: each op's Triton implementation against its torch reference.

Without a GPU the kernels run in Triton's interpreter: TRITON_INTERPRET=1 must be set before
triton.language is first imported (triton.jit picks interpreter or compiler at decoration time,
tl.zeros and the other standard helpers included). The root conftest sets it before any test
module is collected; tests elsewhere may import triton first. With a GPU the kernels compile for
real and the tests run their full-size grids on CUDA tensors.

Without triton installed the whole folder is skipped.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = torch.cuda.is_available()

if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    raise pytest.UsageError(
        "no GPU: run the Triton tests with TRITON_INTERPRET=1 (tests/conftest.py)"
    )

collect_ignore_glob = [] if HAS_TRITON else ["test_*.py"]


@pytest.fixture(autouse=True)
def _dispatch_to_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Public wrappers dispatch to Triton here (also for CPU tensors, under the interpreter);
    tests call the references explicitly. Scoped per test, so other folders keep `auto`."""
    monkeypatch.setenv("MIXSERVE_KERNELS", "triton")


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """CUDA when present (compiled kernels, full-size grids), else CPU (interpreter)."""
    return torch.device("cuda" if ON_GPU else "cpu")
