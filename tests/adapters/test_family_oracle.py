"""Engine logits (fp32) vs an independent float64, per-token oracle (support/oracle.py).

One case per family and routing branch: each writes a synthetic MoE-PEFT adapter with random,
non-zero LoRA and router weights, runs a few sequences through the paged engine with chunked
prefill (plus one base-model sequence in the same batch), and compares every position's logits
with the oracle. Each case also checks that the adapter visibly changes the logits and that the
routing branch it is about was actually taken (the oracle records its routing decisions).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from support.adapter_files import ALL_TARGETS, BaseDims, write_adapter
from support.family_cases import BASE_SEQ, CASES, SEQS, Case
from support.family_oracle import OracleCache, engine_logits, expected_sites
from support.harness import SeqSpec, relative_error
from transformers import AutoConfig

TOL = 1e-4  # engine fp32 vs oracle float64, relative to the largest |logit|
MIN_EFFECT = 1e-2  # the adapter must move the logits at least this much (non-vacuous)
MIN_MARGIN = 1e-5  # routing decisions closer than this to a boundary could flip in fp32
NUM_LAYERS = 2  # the tiny models'


@pytest.fixture(scope="module")
def oracles(
    tiny_model_dirs: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> OracleCache:
    return OracleCache(tiny_model_dirs, str(tmp_path_factory.mktemp("oracle_adapters")))


def _targets(case: Case) -> tuple[str, ...]:
    return tuple(case.write.get("targets", ALL_TARGETS))  # type: ignore[arg-type]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_engine_matches_float64_oracle(
    case: Case, oracles: OracleCache, tiny_model_dirs: dict[str, str]
) -> None:
    prep = oracles.case(case)
    seqs = [SeqSpec(s, case.id) for s in SEQS] + [SeqSpec(BASE_SEQ)]
    got = engine_logits(tiny_model_dirs[case.base], {case.id: prep.adapter_dir}, seqs)
    stats = prep.stats
    errors = [relative_error(g, w) for g, w in zip(got[:-1], prep.want, strict=True)]
    detail = f"errors {errors}, routing {stats}"
    assert stats.min_margin > MIN_MARGIN, f"near-tie routing, pick another seed: {stats}"
    assert max(errors) < TOL, detail
    assert relative_error(got[-1], oracles.base(case.base)[-1]) < TOL, "base sequence disturbed"
    assert prep.effect > MIN_EFFECT, f"adapter barely changes the logits ({prep.effect:.2e})"
    tokens = sum(len(s) for s in SEQS) * NUM_LAYERS
    sites = expected_sites(case.strategy, _targets(case))
    assert dict(stats.routed) == dict.fromkeys(sites, tokens), "oracle routed other sites"
    if case.check is not None:
        assert case.check(stats), f"branch not exercised ({case.what}): {stats}"


def test_many_adapters_in_one_batch(oracles: OracleCache, tiny_model_dirs: dict[str, str]) -> None:
    """Every llama case in one pool; one step holds tokens of all of them and of the base."""
    cases = [c for c in CASES if c.base == "llama"]
    adapters = {c.id: oracles.case(c).adapter_dir for c in cases}
    seqs, want = [], []
    for i, c in enumerate(cases):
        j = i % len(SEQS)
        seqs.append(SeqSpec(SEQS[j], c.id))
        want.append(oracles.case(c).want[j])
    seqs.append(SeqSpec(BASE_SEQ))
    want.append(oracles.base("llama")[-1])
    got = engine_logits(tiny_model_dirs["llama"], adapters, seqs)
    errors = {s.adapter: relative_error(g, w) for s, g, w in zip(seqs, got, want, strict=True)}
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("strategy", ["mixlora", "dynmole", "mola", None])
def test_bin_and_safetensors_give_identical_logits(
    strategy: str | None, tiny_model_dirs: dict[str, str], tmp_path: Path
) -> None:
    model_dir = tiny_model_dirs["llama"]
    dims = BaseDims.of(AutoConfig.from_pretrained(model_dir))
    runs = []
    for fmt in ("bin", "safetensors"):
        path = write_adapter(str(tmp_path / fmt), dims, strategy, seed=3, fmt=fmt)
        assert set(os.listdir(path)) == {"adapter_config.json", f"adapter_model.{fmt}"}
        runs.append(engine_logits(model_dir, {"a": path}, [SeqSpec(s, "a") for s in SEQS]))
    for from_bin, from_st in zip(*runs, strict=True):
        assert torch.equal(from_bin, from_st)
