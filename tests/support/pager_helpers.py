"""Helpers for the AdapterPager tests: real tiny adapters, a scripted loader, pool snapshots.

Background loads are made deterministic with a scripted loader (per-adapter gates and errors):
tests wait on events and futures (`pager.wait`), never on sleeps.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import torch

from mixserve.adapters import (
    AdapterLoadResult,
    AdapterPager,
    AdapterPool,
    AdapterWeights,
    PoolShape,
    load_adapter,
)
from mixserve.kernels import RoutingParams
from mixserve.model import ArchConfig
from support.adapter_files import BaseDims, write_adapter
from support.tiny_models import tiny_config

DIMS = BaseDims.of(tiny_config("llama"))
SHAPE = PoolShape(16, 4, 4, attn_routers=True, mlp_routers=True, ffn_router=True)
BIG = 10**12  # a host budget nothing reaches


class ScriptedLoader:
    """load_adapter behind optional per-name gates and errors; counts calls (worker threads)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.gates: dict[str, threading.Event] = {}
        self.errors: dict[str, BaseException] = {}
        self._lock = threading.Lock()

    def hold(self, name: str) -> threading.Event:
        gate = self.gates[name] = threading.Event()
        return gate

    def __call__(self, name: str, path: str, arch: ArchConfig) -> AdapterWeights:
        with self._lock:
            self.calls[name] += 1
        gate = self.gates.get(name)
        if gate is not None and not gate.wait(60):
            raise TimeoutError("the test never opened this gate")
        error = self.errors.get(name)
        if error is not None:
            raise error
        return load_adapter(name, path, arch)


MakePager = Callable[..., AdapterPager]


def write(tmp_path, name: str, strategy: str | None = None, seed: int = 0, **kw) -> str:
    return write_adapter(str(tmp_path / name), DIMS, strategy, seed=seed, **kw)


def settle(pager: AdapterPager) -> list[AdapterLoadResult]:
    """Start any held load, then poll until no adapter is loading; waits on the load futures,
    not on a clock."""
    pager.start_loads()
    results = pager.poll()
    while pager.stats().loading:
        assert pager.wait(60), "a background load did not finish"
        results += pager.poll()
    return results


def ready(pager: AdapterPager, tmp_path, *names: str, release: bool = True) -> None:
    """Register, acquire and load each (distinct seeds); release again unless told not to."""
    for i, name in enumerate(names):
        pager.add_source(name, write(tmp_path, name, seed=i))
        pager.acquire(name)
    assert all(r.ok for r in settle(pager))
    for name in names:
        assert pager.is_ready(name)
        if release:
            pager.release(name)


def pool_tensors(pool: AdapterPool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {"ffn_slots": pool.ffn_slots}
    for proj, stack in pool.stacks.sites.items():
        out.update({f"{proj}.a": stack.lora_a, f"{proj}.b": stack.lora_b})
        out[f"{proj}.scale"] = stack.scale
        if stack.router is not None:
            out[f"{proj}.router"] = stack.router
        out[f"{proj}.kind"] = pool.site_kinds[proj]
    if pool.stacks.ffn_router is not None:
        out["ffn_router"] = pool.stacks.ffn_router
    for field in RoutingParams.__dataclass_fields__:
        out[f"routing.{field}"] = getattr(pool.routing, field)
    return out


def snapshot(pool: AdapterPool) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pool_tensors(pool).items()}


def assert_pools_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
