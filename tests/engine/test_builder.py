"""build_engine: a build that fails after its adapter load worker started leaves no worker; how
many adapter slots a pool gets."""

from __future__ import annotations

import pytest
import torch
from engine_support import make_model
from support.pager_helpers import SHAPE

from mixserve.adapters import bytes_per_slot
from mixserve.adapters.process_loader import ProcessLoader
from mixserve.config import AdapterPoolConfig, EngineConfig, ModelConfig
from mixserve.engine import builder
from mixserve.model import load_arch


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


def test_a_cpu_engines_read_backs_use_its_loaders_spare_files(tmp_path):
    built = builder.build_engine(EngineConfig(model=ModelConfig(model=make_model(str(tmp_path)))))
    try:
        pager = built.core.pager
        loader = pager._loads._loader
        assert isinstance(loader, ProcessLoader)
        assert pager.tiers.host_copies == loader.exchange_files.host_copies
    finally:
        built.core.pager.close()


def test_slots_from_the_budget_are_capped_at_the_step_sequences(tiny_llama_dir):
    """Without max_num_slots, a budget with room for more slots than a step has sequences
    (max_num_seqs) gets max_num_seqs: a step never holds more adapters than sequences."""
    arch = load_arch(tiny_llama_dir)
    per_slot = bytes_per_slot(SHAPE, arch, torch.float32)
    cpu = torch.device("cpu")

    def slots(max_num_seqs: int, **config: int) -> int:
        pool_config = AdapterPoolConfig(**config)
        return builder._num_slots(pool_config, SHAPE, arch, torch.float32, cpu, max_num_seqs)

    assert slots(8, slot_memory_bytes=100 * per_slot) == 8
    assert slots(8, slot_memory_bytes=5 * per_slot) == 5  # the budget binds first
    assert slots(8, slot_memory_bytes=100 * per_slot, max_num_slots=20) == 20
    assert slots(8, slot_memory_bytes=100 * per_slot, num_slots=3) == 3
    default = slots(10**6)  # the default budget, 2 GiB, binds
    assert default == builder._DEFAULT_SLOT_BUDGET // per_slot == 2 * 2**30 // per_slot
    with pytest.raises(ValueError, match="max_num_slots"):
        AdapterPoolConfig(max_num_slots=0)
