"""The case table of the engine-vs-oracle tests (tests/adapters/test_family_oracle.py): one case
per family and routing branch, each with a check that its routing branch actually ran, and the
sequences every case runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from support.adapter_files import MLP
from support.oracle_routing import RoutingStats

SEQS = (
    list(range(3, 22)),
    [5, 9, 100, 200, 17, 3, 8, 44, 45, 46, 47],
    [7, 250, 31, 64, 12],
)
BASE_SEQ = [11, 12, 13, 90, 91, 92, 5]  # run with no adapter in the same batches
CHUNKS = (5, 1, 3)

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
