"""Fixtures shared by the adapter tests: the tiny llama's ArchConfig and a factory of pagers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from support.pager_helpers import BIG, SHAPE, MakePager

from mixserve.adapters import AdapterPager, AdapterPool, load_adapter
from mixserve.model import ArchConfig, load_arch


@pytest.fixture(scope="module")
def arch(tiny_llama_dir: str) -> ArchConfig:
    return load_arch(tiny_llama_dir)


@pytest.fixture
def make_pager(arch: ArchConfig) -> Iterator[MakePager]:
    made: list[AdapterPager] = []

    def make(*, slots: int = 2, host_budget: int = BIG, loader=load_adapter) -> AdapterPager:
        pool = AdapterPool(arch, SHAPE, slots, torch.float32, "cpu")
        pager = AdapterPager(pool, host_budget_bytes=host_budget, loader=loader)
        made.append(pager)
        return pager

    yield make
    for pager in made:
        pager.close()
