"""Config validation: bad values fail at construction with the field's name."""

from __future__ import annotations

import pytest

from mixserve.config import AdapterPoolConfig


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, float("nan"), float("inf"), 1e10])
def test_a_load_timeout_must_be_positive_and_finite(timeout_s: float):
    with pytest.raises(ValueError, match="load_timeout_s"):
        AdapterPoolConfig(load_timeout_s=timeout_s)


def test_the_default_load_timeout_leaves_slow_disks_time():
    assert AdapterPoolConfig().load_timeout_s >= 60
