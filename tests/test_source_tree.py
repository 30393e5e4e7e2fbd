"""A Python started in the repository root must not import our `kernels/` folder as `kernels`."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_in_root(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_importing_mixserve_in_the_source_root_unshadows_pypi_kernels():
    code = (
        "import importlib.util, os, sys\n"
        "root = os.getcwd()\n"
        "assert importlib.util.find_spec('kernels').origin.startswith(root), 'no shadowing?'\n"
        "import mixserve\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "assert spec is None or not spec.origin.startswith(os.path.join(root, 'kernels')), spec\n"
        "import transformers.activations\n"
    )
    proc = _run_in_root(code)
    assert proc.returncode == 0, proc.stderr
