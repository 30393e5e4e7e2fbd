"""Fixtures of the kernel tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def reference_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrappers run the torch references on CPU, not the compiled CPU kernels."""
    monkeypatch.setenv("MIXSERVE_KERNELS", "reference")
