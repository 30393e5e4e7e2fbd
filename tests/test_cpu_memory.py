"""glibc malloc thresholds for CPU engines (mixserve.cpu_memory) and when the builder sets them."""

from __future__ import annotations

import platform
import sys

import pytest
from engine_support import make_model

from mixserve.config import EngineConfig, ModelConfig
from mixserve.cpu_memory import keep_freed_memory
from mixserve.engine import builder


def _is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not _is_glibc(), reason="mallopt thresholds are a glibc feature")
def test_glibc_accepts_both_thresholds_every_time():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True


@pytest.mark.parametrize("tune", [True, False])
def test_builder_tunes_malloc_only_when_asked_on_cpu(tmp_path, monkeypatch, tune):
    calls = []
    monkeypatch.setattr(builder, "keep_freed_memory", lambda: calls.append(1) or True)
    model_dir = make_model(str(tmp_path))
    config = EngineConfig(model=ModelConfig(model=model_dir), tune_malloc=tune)
    built = builder.build_engine(config)
    if built.core.pager is not None:
        built.core.pager.close()
    assert calls == ([1] if tune else [])
