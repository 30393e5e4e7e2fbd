"""Writing the family cases' adapters, running them through the paged engine, and computing
their float64 oracle logits once per test module (tests/adapters/test_family_oracle.py)."""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass

import torch
from transformers import AutoConfig

from mixserve.adapters import AdapterPool, PoolShape, load_adapter
from mixserve.model import load_model
from support.adapter_files import (
    ALL_TARGETS,
    MLP,
    BaseDims,
    make_config,
    make_weights,
    save_weights,
    write_adapter,
)
from support.family_cases import BASE_SEQ, CHUNKS, SEQS, Case
from support.harness import SeqSpec, make_runner, relative_error, run_sequences
from support.oracle import Oracle
from support.oracle_adapter import LEGACY_PROJ
from support.oracle_routing import RoutingStats


def expected_sites(strategy: str | None, targets: tuple[str, ...]) -> set[str]:
    """Where the spec puts routers: the whole FFN (MixLoRA), MLP projections (LoRAMoE), every
    targeted projection (MoLA, DynMoLE)."""
    if strategy is None:
        return set()
    if strategy.startswith("mix"):
        return {"ffn"}
    if strategy == "loramoe":
        return {t for t in targets if t in MLP}
    return set(targets)


def write_legacy_mixlora(path: str, dims: BaseDims, *, expert_names: str, seed: int) -> str:
    """An m-LoRA era MixLoRA file (routing_strategy "mixtral", spec §1.5): router at
    mixlora.layers.{i}.gate.weight, experts at mixlora.layers.{i}.experts.{j}.{proj} with proj
    spelled w1/w2/w3 ("legacy") or gate/down/up ("modern"); config targets say w1/w2/w3."""
    os.makedirs(path, exist_ok=True)
    modern = make_weights(
        dims,
        "mixlora",
        r=8,
        num_experts=4,
        targets=ALL_TARGETS,
        seed=seed,
        delta_scale=0.5,
        router_scale=2.0,
    )
    to_legacy = {v: k for k, v in LEGACY_PROJ.items()}
    weights: dict[str, torch.Tensor] = {}
    for key, value in modern.items():
        if m := re.fullmatch(r"mixlora\.layers\.(\d+)\.mlp\.moe_gate\.weight", key):
            key = f"mixlora.layers.{m[1]}.gate.weight"
        elif m := re.fullmatch(r"mixlora\.layers\.(\d+)\.mlp\.(\w+)\.experts\.(\d+)\.(.+)", key):
            proj = to_legacy[m[2]] if expert_names == "legacy" else m[2]
            key = f"mixlora.layers.{m[1]}.experts.{m[3]}.{proj}.{m[4]}"
        weights[key] = value
    assert not any(".mlp." in k for k in weights)
    targets = tuple(to_legacy.get(t, t) for t in ALL_TARGETS)
    config = make_config(
        "mixlora", r=8, alpha=16, num_experts=4, targets=targets, routing_strategy="mixtral"
    )
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_weights(path, weights, "bin")
    return path


def write_case(case: Case, path: str, dims: BaseDims, *, seed: int, fmt: str = "bin") -> str:
    if case.strategy == "mixtral":
        names = str(case.write["expert_names"])
        return write_legacy_mixlora(path, dims, expert_names=names, seed=seed)
    write_adapter(path, dims, case.strategy, seed=seed, fmt=fmt, **case.write)  # type: ignore[arg-type]
    if case.drop:
        file = os.path.join(path, "adapter_config.json")
        with open(file) as f:
            config = json.load(f)
        for key in case.drop:
            del config[key]
        with open(file, "w") as f:
            json.dump(config, f, indent=2)
    return path


def engine_logits(
    model_dir: str, adapters: dict[str, str], seqs: list[SeqSpec]
) -> list[torch.Tensor]:
    """All-position fp32 logits from the paged engine, every adapter in its own pool slot."""
    model = load_model(model_dir)
    weights = [load_adapter(name, path, model.arch) for name, path in adapters.items()]
    shape = PoolShape.covering([w.spec for w in weights], model.arch.num_layers)
    pool = AdapterPool(model.arch, shape, len(weights), model.dtype, model.device)
    for slot, w in enumerate(weights):
        pool.load(slot, w)
    slots = {name: slot for slot, name in enumerate(adapters)}
    runner = make_runner(model, pool, num_blocks=256)
    return run_sequences(runner, seqs, slots, chunk_sizes=CHUNKS)


@dataclass
class Prepared:
    adapter_dir: str
    want: list[torch.Tensor]  # oracle logits per SEQS entry, float64
    stats: RoutingStats
    effect: float  # min over SEQS of relative_error(adapter logits, base logits)


class OracleCache:
    """Adapters written and oracle logits computed once per module, shared by the tests."""

    def __init__(self, model_dirs: dict[str, str], root: str) -> None:
        self.model_dirs, self.root = model_dirs, root
        self._base: dict[str, list[torch.Tensor]] = {}
        self._cases: dict[str, Prepared] = {}

    def base(self, family: str) -> list[torch.Tensor]:
        """Base-model oracle logits of SEQS and then BASE_SEQ."""
        if family not in self._base:
            oracle = Oracle(self.model_dirs[family])
            self._base[family] = [oracle.logits(s) for s in (*SEQS, BASE_SEQ)]
        return self._base[family]

    def case(self, case: Case) -> Prepared:
        if case.id not in self._cases:
            model_dir = self.model_dirs[case.base]
            dims = BaseDims.of(AutoConfig.from_pretrained(model_dir))
            path = os.path.join(self.root, case.id)
            seed = zlib.crc32(case.id.encode()) % 10_000 if case.seed is None else case.seed
            write_case(case, path, dims, seed=seed)
            oracle = Oracle(model_dir, path)
            want = [oracle.logits(s) for s in SEQS]
            base = self.base(case.base)[: len(SEQS)]
            effect = min(relative_error(w, b) for w, b in zip(want, base, strict=True))
            self._cases[case.id] = Prepared(path, want, oracle.stats, effect)
        return self._cases[case.id]
