"""One forward step mixing many adapters: every sequence gets what it gets when run alone."""

from __future__ import annotations

import pytest
import torch
from support.adapter_files import MIXED_ADAPTERS as ADAPTERS
from support.adapter_files import BaseDims, write_adapter
from support.harness import SeqSpec, make_runner, relative_error, run_sequences
from support.tiny_models import tiny_config

from mixserve.adapters import AdapterPool, PoolShape, load_adapter
from mixserve.model import load_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_model_dirs):
    family = "qwen3"
    model_dir = tiny_model_dirs[family]
    dims = BaseDims.of(tiny_config(family))
    root = tmp_path_factory.mktemp("mixed")
    model = load_model(model_dir)
    weights = []
    for seed, (name, (strategy, r, experts, targets)) in enumerate(ADAPTERS.items()):
        path = write_adapter(
            str(root / name),
            dims,
            strategy,
            r=r,
            num_experts=experts,
            targets=targets,
            seed=seed,
            fmt="safetensors" if seed % 2 else "bin",
        )
        weights.append(load_adapter(name, path, model.arch))
    shape = PoolShape.covering([w.spec for w in weights], model.arch.num_layers)
    pool = AdapterPool(model.arch, shape, len(weights) + 2, model.dtype, model.device)
    slots = {}
    for slot, w in enumerate(weights):  # leave empty slots between them
        pool.load(slot + 1 if slot >= 3 else slot, w)
        slots[w.name] = slot + 1 if slot >= 3 else slot
    return model, pool, slots


def _sequences() -> list[SeqSpec]:
    gen = torch.Generator().manual_seed(0)
    names = [*ADAPTERS, None, "mix", None, "dynmole"]
    return [
        SeqSpec(torch.randint(2, 250, (int(n),), generator=gen).tolist(), name)
        for name, n in zip(names, torch.randint(1, 30, (len(names),), generator=gen), strict=True)
    ]


def test_mixed_batch_equals_each_sequence_alone(engine):
    model, pool, slots = engine
    seqs = _sequences()
    assert len({s.adapter for s in seqs if s.adapter}) >= 5
    # Chunk sizes cycle per sequence, so each step mixes prefill chunks with single tokens of
    # sequences that are effectively decoding, across all adapters and the base model.
    together = run_sequences(
        make_runner(model, pool, num_blocks=256), seqs, slots, chunk_sizes=[1, 6, 2, 1, 9]
    )
    for seq, got in zip(seqs, together, strict=True):
        alone = run_sequences(make_runner(model, pool, num_blocks=64), [seq], slots)[0]
        assert relative_error(got, alone) < 1e-5


def test_each_adapter_changes_its_tokens_and_no_others(engine):
    model, pool, slots = engine
    seqs = _sequences()
    base_seqs = [SeqSpec(s.token_ids, None) for s in seqs]
    base = run_sequences(
        make_runner(model, pool, num_blocks=256), base_seqs, slots, chunk_sizes=[3]
    )
    mixed = run_sequences(make_runner(model, pool, num_blocks=256), seqs, slots, chunk_sizes=[3])
    for seq, b, m in zip(seqs, base, mixed, strict=True):
        if seq.adapter is None:
            # Same step shapes as the base-only run: any leaked delta would be far above rounding.
            assert relative_error(m, b) < 1e-6
        else:
            assert relative_error(m, b) > 1e-3, seq.adapter
