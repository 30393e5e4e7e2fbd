"""The float64 oracle's own rules (support/oracle_routing.py, support/oracle.py), on
hand-computed examples: routing, normalised entropy, and no adapter = transformers."""

from __future__ import annotations

import pytest
import torch
from support.family_cases import SEQS
from support.harness import relative_error
from support.oracle import Oracle
from support.oracle_routing import (
    normalised_entropy,
    route_dynmole,
    route_switch,
    route_top_k,
    route_top_p,
)
from support.tiny_models import load_reference

# --- the oracle's own rules, on hand-computed examples --------------------------------------------


def _close(got: dict[int, float], want: dict[int, float]) -> bool:
    return got.keys() == want.keys() and all(abs(got[e] - want[e]) < 1e-12 for e in want)


def test_oracle_routing_rules_on_hand_computed_examples() -> None:
    p = [0.1, 0.5, 0.3, 0.1]
    assert _close(route_top_k(p, 2).weights, {1: 0.625, 2: 0.375})  # renormalised
    # top-p 0.8: cumsum 0.5, 0.8 (not > 0.8), 0.9 crosses -> three kept, raw weights
    assert _close(route_top_p([0.5, 0.3, 0.15, 0.05], 0.8, 0.0).weights, {0: 0.5, 1: 0.3, 2: 0.15})
    assert _close(route_top_p([0.1, 0.6, 0.3], 0.5, 0.0).weights, {1: 0.6})  # first one crosses
    # temperature divides the probabilities: 0.25, 0.15, 0.1 never exceed 0.8 -> all kept
    halved = route_top_p([0.5, 0.3, 0.2], 0.8, 2.0).weights
    assert _close(halved, {0: 0.25, 1: 0.15, 2: 0.1})
    assert _close(route_switch(p).weights, {1: 0.5})
    cfg = {"top_p": 0.75, "keep_top_k": 1, "entropy_threshold": 0.9, "entropy_index": 1.1}
    # strictly inside top_p: 0.5 <= 0.75 kept, 0.8 > 0.75 not (unlike mixlora-dynamic)
    sharp = route_dynmole([0.5, 0.3, 0.15, 0.05], cfg)
    assert _close(sharp.weights, {0: 0.5}) and not sharp.dense
    wide = route_dynmole([0.5, 0.3, 0.15, 0.05], {**cfg, "top_p": 0.85})
    assert _close(wide.weights, {0: 0.5, 1: 0.3}) and wide.beyond_keep
    flat = route_dynmole([0.3, 0.25, 0.25, 0.2], cfg)  # entropy ~0.99 > 0.9: every expert
    assert flat.dense and len(flat.weights) == 4 and abs(sum(flat.weights.values()) - 1) < 1e-12
    assert not route_dynmole([0.3, 0.25, 0.25, 0.2], {**cfg, "entropy_threshold": 1.0}).dense


@pytest.mark.parametrize("kind", ["tsallis", "renyi"])
@pytest.mark.parametrize("q", [0.5, 1.0, 1.1, 2.0])
def test_oracle_entropy_is_normalised(kind: str, q: float) -> None:
    # (Renyi adds 1e-10 inside its log; the one-hot case needs eps > 0 for the Shannon log)
    assert abs(normalised_entropy([0.25] * 4, q, kind, 0.0) - 1.0) < 1e-9
    assert abs(normalised_entropy([1.0, 0.0, 0.0, 0.0], q, kind, 1e-15)) < 1e-6
    # Tsallis q=2 of (0.7, 0.1, 0.1, 0.1): (1 - 0.52) / (1 - 1/4)
    if kind == "tsallis" and q == 2.0:
        assert abs(normalised_entropy([0.7, 0.1, 0.1, 0.1], q, kind, 0.0) - 0.64) < 1e-12


def test_oracle_without_adapter_is_transformers(tiny_model_dirs: dict[str, str]) -> None:
    path = tiny_model_dirs["qwen3"]
    with torch.no_grad():
        ref = load_reference(path)(torch.tensor([SEQS[0]])).logits[0]
    assert relative_error(Oracle(path).logits(SEQS[0]), ref) < 1e-5
