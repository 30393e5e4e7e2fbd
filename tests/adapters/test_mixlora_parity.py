"""MixLoRA top-k: mixserve's logits equal the authors' `mixlora` package (dropout forced off)."""

from __future__ import annotations

import pytest
import torch
from support.adapter_files import BaseDims, write_adapter
from support.harness import SeqSpec, make_runner, relative_error, run_sequences
from support.reference_mixlora import inject_mixlora
from support.tiny_models import load_reference

from mixserve.adapters import AdapterPool, PoolShape, load_adapter
from mixserve.model import load_model


def _engine_logits(model_dir: str, adapter_dir: str, seqs: list[SeqSpec], chunks: list[int] | None):
    model = load_model(model_dir)
    weights = load_adapter("mx", adapter_dir, model.arch)
    shape = PoolShape.covering([weights.spec], model.arch.num_layers)
    pool = AdapterPool(model.arch, shape, 3, model.dtype, model.device)
    pool.load(2, weights)
    runner = make_runner(model, pool, num_blocks=128, block_size=8)
    return run_sequences(runner, seqs, {"mx": 2}, chunk_sizes=chunks)


def _reference_logits(model: torch.nn.Module, seqs: list[SeqSpec]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([s.token_ids])).logits[0] for s in seqs]


@pytest.mark.parametrize(
    ("num_experts", "top_k", "targets"),
    [
        (4, 2, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")),
        (8, 3, ("gate_proj", "down_proj", "up_proj")),
        (3, 1, ("q_proj", "v_proj", "up_proj")),
    ],
)
def test_tiny_llama_matches_mixlora_package(tmp_path, tiny_llama_dir, num_experts, top_k, targets):
    reference = load_reference(tiny_llama_dir)
    adapter = write_adapter(
        str(tmp_path / "mx"),
        BaseDims.of(reference.config),
        "mixlora",
        r=8,
        num_experts=num_experts,
        targets=targets,
        top_k=top_k,
        seed=3,
    )
    seqs = [
        SeqSpec(list(range(3, 23)), "mx"),
        SeqSpec(list(range(90, 99)), "mx"),
        SeqSpec([5], "mx"),
    ]
    base = _reference_logits(reference, seqs)
    want = _reference_logits(inject_mixlora(reference, adapter), seqs)
    got = _engine_logits(tiny_llama_dir, adapter, seqs, chunks=[4, 1, 7])
    for b, w, g in zip(base, want, got, strict=True):
        assert relative_error(b, w) > 1e-2, "the adapter must visibly change the logits"
        assert relative_error(g, w) < 1e-4


def test_smollm2_matches_mixlora_package(tmp_path, smollm2_dir):
    reference = load_reference(smollm2_dir)
    adapter = write_adapter(
        str(tmp_path / "mx"),
        BaseDims.of(reference.config),
        "mixlora",
        r=16,
        num_experts=8,
        seed=11,
        delta_scale=0.2,
        router_scale=2.0,
    )
    seqs = [SeqSpec(list(range(1000, 1024)), "mx"), SeqSpec([1, 9690, 198, 2683, 359, 253], "mx")]
    base = _reference_logits(reference, seqs)
    want = _reference_logits(inject_mixlora(reference, adapter), seqs)
    got = _engine_logits(smollm2_dir, adapter, seqs, chunks=[10, 1])
    for b, w, g in zip(base, want, got, strict=True):
        assert relative_error(b, w) > 1e-2, "the adapter must visibly change the logits"
        assert relative_error(g, w) < 1e-4
