"""Engine logits (fp32) vs an independent float64, per-token oracle (support/oracle.py).

One case per family and routing branch: each writes a synthetic MoE-PEFT adapter with random,
non-zero LoRA and router weights, runs a few sequences through the paged engine with chunked
prefill (plus one base-model sequence in the same batch), and compares every position's logits
with the oracle. Each case also checks that the adapter visibly changes the logits and that the
routing branch it is about was actually taken (the oracle records its routing decisions).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from support.adapter_files import (
    ALL_TARGETS,
    MLP,
    BaseDims,
    make_config,
    make_weights,
    save_weights,
    write_adapter,
)
from support.harness import SeqSpec, make_runner, relative_error, run_sequences
from support.oracle import (
    LEGACY_PROJ,
    Oracle,
    RoutingStats,
    normalised_entropy,
    route_dynmole,
    route_switch,
    route_top_k,
    route_top_p,
)
from support.tiny_models import load_reference
from transformers import AutoConfig

from mixserve.adapters import AdapterPool, PoolShape, load_adapter
from mixserve.model import load_model

TOL = 1e-4  # engine fp32 vs oracle float64, relative to the largest |logit|
MIN_EFFECT = 1e-2  # the adapter must move the logits at least this much (non-vacuous)
MIN_MARGIN = 1e-5  # routing decisions closer than this to a boundary could flip in fp32
SEQS = (
    list(range(3, 22)),
    [5, 9, 100, 200, 17, 3, 8, 44, 45, 46, 47],
    [7, 250, 31, 64, 12],
)
BASE_SEQ = [11, 12, 13, 90, 91, 92, 5]  # run with no adapter in the same batches
CHUNKS = (5, 1, 3)
NUM_LAYERS = 2  # the tiny models'

StatsCheck = Callable[[RoutingStats], bool]


@dataclass(frozen=True)
class Case:
    id: str
    base: str  # tiny model family
    strategy: str | None  # None = plain MoE-PEFT LoRA; "mixtral" = legacy m-LoRA file
    write: dict[str, object] = field(default_factory=dict)  # write_adapter keyword arguments
    check: StatsCheck | None = None  # did the routing branch under test run?
    what: str = ""  # what check asserts, for the failure message
    drop: tuple[str, ...] = ()  # config keys to delete afterwards (older files lack them)
    seed: int | None = None  # None: derived from id (stable when cases are added)


def _counts(*allowed: int) -> StatsCheck:
    return lambda st: set(st.experts_per_token) == set(allowed)


def _varied(st: RoutingStats) -> bool:
    return len(st.experts_per_token) >= 2


def _dynmole_all_branches(st: RoutingStats) -> bool:
    """Tokens with exactly keep_top_k experts, with more via top-p, and all via entropy."""
    return st.experts_per_token[2] > 0 and st.beyond_keep_tokens > 0 and st.dense_tokens > 0


DYNMOLE = {"num_experts": 6, "router_scale": 1.5, "keep_top_k": 2}  # exercises all branches
EXPERT_LORA = {"r": 16, "lora_alpha": 8, "lora_dropout": 0.05, "bias": "none"}

CASES = [
    Case("mixlora", "llama", "mixlora", {}, _counts(2), "top-2 everywhere"),
    Case(
        "mixlora-top3-e8",
        "llama",
        "mixlora",
        {"num_experts": 8, "top_k": 3, "targets": ("q_proj", "gate_proj", "down_proj")},
        _counts(3),
        "top-3 everywhere",
    ),
    Case("mixlora-dynamic", "llama", "mixlora-dynamic", {}, _varied, "varying expert counts"),
    Case(
        "mixlora-dynamic-t0.5",
        "llama",
        "mixlora-dynamic",
        {"temperature": 0.5},
        _varied,
        "varying expert counts",
    ),
    Case(
        "mixlora-dynamic-t1.5",  # p / 1.5 sums to 2/3 < top_p: nothing crosses, all experts
        "llama",
        "mixlora-dynamic",
        {"temperature": 1.5},
        _counts(4),
        "all 4 experts (no rank crosses top_p)",
    ),
    Case("mixlora-switch", "llama", "mixlora-switch", {}, _counts(1), "one expert"),
    Case("loramoe", "llama", "loramoe", {}, _counts(4), "dense over 4 experts"),
    Case("mola", "llama", "mola", {}, _counts(2), "top-2 at every site"),
    Case(
        "dynmole-tsallis",
        "llama",
        "dynmole",
        {**DYNMOLE, "entropy_type": "tsallis"},
        _dynmole_all_branches,
        "keep_top_k, top-p and entropy branches",
    ),
    Case(
        "dynmole-renyi",
        "llama",
        "dynmole",
        {**DYNMOLE, "entropy_type": "renyi"},
        _dynmole_all_branches,
        "keep_top_k, top-p and entropy branches",
    ),
    Case(
        "dynmole-shannon",
        "llama",
        "dynmole",
        {**DYNMOLE, "entropy_index": 1.0},
        _dynmole_all_branches,
        "keep_top_k, top-p and entropy branches",
    ),
    Case(
        "dynmole-no-broadcast",  # threshold >= 1 switches the entropy branch off
        "llama",
        "dynmole",
        {**DYNMOLE, "entropy_threshold": 1.0},
        lambda st: st.dense_tokens == 0 and st.beyond_keep_tokens > 0,
        "no dense tokens, some top-p tokens",
    ),
    Case(
        "dynmole-mlp-only-no-type",  # files before 9354b27 lack entropy_type: tsallis
        "llama",
        "dynmole",
        {**DYNMOLE, "targets": MLP},
        _dynmole_all_branches,
        "keep_top_k, top-p and entropy branches",
        drop=("entropy_type",),
    ),
    Case("lora", "llama", None, {}),
    Case("lora-rslora", "llama", None, {"use_rslora": True}),
    Case(
        "mixlora-expert-lora",
        "llama",
        "mixlora",
        {"expert_r": 16, "expert_lora": EXPERT_LORA},
        _counts(2),
        "top-2 everywhere",
    ),
    Case(
        "mixlora-expert-lora-rslora-inherited",
        "llama",
        "mixlora",
        {"use_rslora": True, "expert_r": 4, "expert_lora": {"r": 4, "lora_alpha": 4}},
        _counts(2),
        "top-2 everywhere",
    ),
    Case(
        "mixlora-legacy-w123",
        "llama",
        "mixtral",
        {"expert_names": "legacy"},
        _counts(2),
        "top-2 everywhere",
    ),
    Case(
        "mixlora-legacy-modern",
        "llama",
        "mixtral",
        {"expert_names": "modern"},
        _counts(2),
        "top-2 everywhere",
    ),
    Case(
        "mixlora-act-gelu",  # act_fn picks the expert activation, not the base's hidden_act
        "llama",
        "mixlora",
        {"act_fn": "gelu"},
        _counts(2),
        "top-2 everywhere",
    ),
    Case(
        "mola-ignores-expert-lora",  # expert_lora is a MixLoRA key only (MoE-PEFT MixConfig)
        "llama",
        "mola",
        {"expert_lora": {"lora_alpha": 64}},
        _counts(2),
        "top-2 at every site",
        seed=1,  # the derived seed routes one token 1.1e-5 from a tie
    ),
    Case("qwen3-mixlora", "qwen3", "mixlora", {}, _counts(2), "top-2 everywhere"),
    Case(
        "qwen3-dynmole",
        "qwen3",
        "dynmole",
        DYNMOLE,
        _dynmole_all_branches,
        "keep_top_k, top-p and entropy branches",
    ),
    Case("qwen3-lora", "qwen3", None, {}),
    Case("qwen2-mola", "qwen2", "mola", {}, _counts(2), "top-2 at every site"),
    Case("qwen2-loramoe", "qwen2", "loramoe", {}, _counts(4), "dense over 4 experts"),
    Case("qwen2-mixlora-dynamic", "qwen2", "mixlora-dynamic", {}, _varied, "varying counts"),
    Case("mistral-mixlora-switch", "mistral", "mixlora-switch", {}, _counts(1), "one expert"),
    # Biased base: expert outputs carry the down bias, so weights that do not sum to 1 scale it.
    Case("bias-mixlora-switch", "llama-bias", "mixlora-switch", {}, _counts(1), "one expert"),
    Case("bias-mixlora-dynamic", "llama-bias", "mixlora-dynamic", {}, _varied, "varying counts"),
    Case("bias-dynmole", "llama-bias", "dynmole", DYNMOLE, _dynmole_all_branches, "all branches"),
]


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
