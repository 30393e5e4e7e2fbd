"""build_engine: a build that fails after its adapter load worker started leaves no worker."""

from __future__ import annotations

import pytest
from engine_support import make_model

from mixserve.adapters.process_loader import ProcessLoader
from mixserve.config import EngineConfig, ModelConfig
from mixserve.engine import builder


def test_a_failed_build_closes_its_load_worker(tmp_path, monkeypatch):
    started: list[ProcessLoader] = []

    class RecordedLoader(ProcessLoader):
        def start(self) -> None:
            started.append(self)
            super().start()
            self.started_procs = [worker.proc for worker in self._workers]

    def no_pool(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no memory for the adapter pool")

    monkeypatch.setattr(builder, "ProcessLoader", RecordedLoader)
    monkeypatch.setattr(builder, "AdapterPool", no_pool)
    config = EngineConfig(model=ModelConfig(model=make_model(str(tmp_path))))
    with pytest.raises(RuntimeError, match="no memory for the adapter pool"):
        builder.build_engine(config)
    (loader,) = started
    assert len(loader.started_procs) == 1
    assert loader._closed and loader._workers == []
    for proc in loader.started_procs:
        assert proc.wait(timeout=30) is not None  # it exits at the EOF on its stdin
