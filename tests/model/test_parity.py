"""Base model parity: our paged runner vs transformers on the same weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from support.harness import SeqSpec, make_runner, relative_error, run_sequences
from support.tiny_models import FAMILIES, load_reference

from mixserve.model import load_model
from mixserve.model.decoder import DecoderModel

SEQS = [SeqSpec(list(range(3, 22))), SeqSpec(list(range(40, 51))), SeqSpec([7])]


def _reference_logits(ref: torch.nn.Module, seqs: list[SeqSpec]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [ref(torch.tensor([s.token_ids])).logits[0] for s in seqs]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunks", [None, [5, 1, 3]], ids=["whole", "chunked"])
def test_tiny_model_logits_match_transformers(tiny_model_dirs, family, chunks):
    path = tiny_model_dirs[family]
    ours = run_sequences(make_runner(load_model(path)), SEQS, chunk_sizes=chunks)
    for got, want in zip(ours, _reference_logits(load_reference(path), SEQS), strict=True):
        assert relative_error(got, want) < 1e-4


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_sliding_window_is_what_makes_the_match(tiny_model_dirs, family):
    """Without the window the same weights must disagree: the parity above is not vacuous."""
    path = tiny_model_dirs[family]
    model = load_model(path)
    assert any(w is not None for w in model.arch.sliding_windows)
    full = dataclasses.replace(model.arch, sliding_windows=(None,) * model.arch.num_layers)
    ours = run_sequences(make_runner(DecoderModel(full, model.weights)), SEQS[:1])
    assert relative_error(ours[0], _reference_logits(load_reference(path), SEQS[:1])[0]) > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading_tracks_transformers(tiny_model_dirs, dtype):
    path = tiny_model_dirs["llama"]
    ours = run_sequences(make_runner(load_model(path, dtype=dtype)), SEQS[:2], chunk_sizes=[4])
    want = _reference_logits(load_reference(path, dtype=dtype), SEQS[:2])
    for got, ref in zip(ours, want, strict=True):
        assert relative_error(got, ref.float()) < 3e-2
