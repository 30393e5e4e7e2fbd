"""adapter_config.json -> AdapterSpec, with every value checked (mixlora_spec.md §1.2, §7)."""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping
from typing import Any

from mixserve.adapters.errors import (
    AdapterConfigError,
    UnknownRoutingStrategyError,
    UnsupportedAdapterError,
)
from mixserve.adapters.spec import (
    FAMILY_KEY_PREFIX,
    FOREIGN_PROJECTIONS,
    LEGACY_PROJECTION_NAMES,
    STRATEGY_RULE,
    AdapterFamily,
    AdapterSpec,
    LoraSettings,
    canonical_projection_order,
)
from mixserve.kernels import RoutingRule
from mixserve.model.arch import PROJECTIONS

logger = logging.getLogger(__name__)

_PEFT_TYPES = {
    "LORA": AdapterFamily.LORA,
    "MIXLORA": AdapterFamily.MIXLORA,
    "LORAMOE": AdapterFamily.LORAMOE,
    "MOLA": AdapterFamily.MOLA,
    "DYNMOLE": AdapterFamily.DYNMOLE,
}
_STRATEGY_FAMILY = {
    "mixlora": AdapterFamily.MIXLORA,
    "mixlora-dynamic": AdapterFamily.MIXLORA,
    "mixlora-switch": AdapterFamily.MIXLORA,
    "loramoe": AdapterFamily.LORAMOE,
    "mola": AdapterFamily.MOLA,
    "dynmole": AdapterFamily.DYNMOLE,
}
_LEGACY_STRATEGY = "mixtral"
_SERVED_TASKS = (None, "CAUSAL_LM", "QUESTION_ANS")


class _Reader:
    """Typed access to config values; every failure names the adapter, file and key."""

    def __init__(self, adapter: str, file: str, raw: Mapping[str, Any]) -> None:
        self.adapter, self.file, self.raw = adapter, file, raw

    def fail(self, key: str, problem: str) -> AdapterConfigError:
        return AdapterConfigError(self.adapter, problem, file=self.file, key=key)

    def number(
        self,
        key: str,
        default: float | None,
        *,
        low: float,
        high: float = float("inf"),
        low_open: bool = False,
    ) -> float:
        value = self.raw.get(key, default)
        if value is None:
            raise self.fail(key, "required")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self.fail(key, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise self.fail(key, f"must be finite, got {value!r}")
        below = value <= low if low_open else value < low
        if below or value > high:
            bound = f"{'>' if low_open else '>='} {low}" + (
                f" and <= {high}" if high != float("inf") else ""
            )
            raise self.fail(key, f"must be {bound}, got {value!r}")
        return float(value)

    def integer(self, key: str, default: int | None, *, low: int) -> int:
        value = self.raw.get(key, default)
        if value is None:
            raise self.fail(key, "required")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"must be an integer, got {value!r}")
        if value < low:
            raise self.fail(key, f"must be >= {low}, got {value}")
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value


def _family(r: _Reader) -> tuple[AdapterFamily, str | None, bool]:
    """(family, routing strategy, legacy naming) by MoE-PEFT's precedence."""
    peft_type = r.raw.get("peft_type")
    strategy = r.raw.get("routing_strategy")
    if strategy is not None and not isinstance(strategy, str):
        raise UnknownRoutingStrategyError(
            r.adapter, f"must be a string, got {strategy!r}", file=r.file, key="routing_strategy"
        )
    if peft_type is not None and not isinstance(peft_type, str):
        raise r.fail("peft_type", f"must be a string, got {peft_type!r}")
    legacy = strategy == _LEGACY_STRATEGY
    if legacy:
        strategy = "mixlora"
    if strategy is not None and strategy not in _STRATEGY_FAMILY:
        raise UnknownRoutingStrategyError(
            r.adapter,
            f"unknown routing_strategy {strategy!r} "
            f"(known: {', '.join(_STRATEGY_FAMILY)}, legacy 'mixtral')",
            file=r.file,
            key="routing_strategy",
        )
    if peft_type in _PEFT_TYPES:
        family = _PEFT_TYPES[peft_type]
        if family is AdapterFamily.LORA:
            return family, None, False
        if family is AdapterFamily.MIXLORA and strategy is None:
            raise r.fail("routing_strategy", "required for peft_type MIXLORA")
        strategy = strategy or family.value
        if _STRATEGY_FAMILY[strategy] is not family:
            raise r.fail("routing_strategy", f"{strategy!r} contradicts peft_type {peft_type!r}")
        return family, strategy, legacy
    if strategy is not None:
        return _STRATEGY_FAMILY[strategy], strategy, legacy
    if peft_type is not None:
        raise UnsupportedAdapterError(
            r.adapter,
            f"peft_type {peft_type!r} is not served (LoRA, MIXLORA, LORAMOE, MOLA, DYNMOLE are)",
            file=r.file,
            key="peft_type",
        )
    return AdapterFamily.LORA, None, False


def _targets(r: _Reader, legacy: bool) -> tuple[tuple[str, ...], bool]:
    """(canonical target projections, whether the sites must be read off the weight keys)."""
    value = r.raw.get("target_modules")
    if isinstance(value, str):  # PEFT: a regex or "all-linear"
        return (), True
    if isinstance(value, Mapping):
        names = [k for k, on in value.items() if on is True]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        names = list(value)
    else:
        raise r.fail("target_modules", f"must be a list of module names, got {value!r}")
    canonical: set[str] = set()
    for name in names:
        name = LEGACY_PROJECTION_NAMES.get(name, name) if legacy else name
        if name in PROJECTIONS:
            canonical.add(name)
        elif name in FOREIGN_PROJECTIONS:
            raise UnsupportedAdapterError(
                r.adapter,
                f"targets {name!r}, a projection of another model family (Phi/GLM); "
                "llama, mistral, qwen2 and qwen3 bases are served",
                file=r.file,
                key="target_modules",
            )
        else:
            logger.warning("adapter '%s': ignoring unknown target module %r", r.adapter, name)
    if not canonical:
        raise r.fail("target_modules", "names no projection this server adapts")
    return canonical_projection_order(canonical), False


def _lora_settings(r: _Reader, raw: Mapping[str, Any], key_prefix: str = "") -> LoraSettings:
    sub = _Reader(r.adapter, r.file, raw)
    try:
        rank = sub.integer("r", None, low=1)
        alpha = sub.number("lora_alpha", None, low=0.0, low_open=True)
        rslora = sub.flag("use_rslora")
    except AdapterConfigError as exc:
        raise r.fail(key_prefix + (exc.key or ""), exc.problem) from exc
    return LoraSettings(r=rank, alpha=alpha, use_rslora=rslora)


def _check_peft_options(r: _Reader) -> None:
    raw = r.raw
    unsupported = []
    if raw.get("bias", "none") != "none":
        unsupported.append(f"bias={raw['bias']!r}")
    if raw.get("modules_to_save"):
        unsupported.append("modules_to_save")
    if raw.get("lora_bias"):
        unsupported.append("lora_bias")
    if raw.get("fan_in_fan_out"):
        unsupported.append("fan_in_fan_out")
    if raw.get("target_parameters"):
        unsupported.append("target_parameters")
    if raw.get("trainable_token_indices"):
        unsupported.append("trainable_token_indices")
    if unsupported:
        raise UnsupportedAdapterError(
            r.adapter, f"PEFT options not served: {', '.join(unsupported)}", file=r.file
        )


def _layers(r: _Reader) -> tuple[int, ...] | None:
    value = r.raw.get("layers_to_transform")
    if value is None:
        return None
    values = [value] if isinstance(value, int) else value
    if not isinstance(values, list) or not all(isinstance(v, int) and v >= 0 for v in values):
        raise r.fail("layers_to_transform", f"must be layer indices, got {value!r}")
    return tuple(sorted(set(values)))


def _patterns(r: _Reader, key: str, integer: bool) -> tuple[tuple[str, float], ...]:
    value = r.raw.get(key) or {}
    if not isinstance(value, Mapping):
        raise r.fail(key, f"must be an object, got {value!r}")
    out = []
    for pattern, v in value.items():
        ok = isinstance(v, int) if integer else isinstance(v, numbers.Real)
        if isinstance(v, bool) or not ok or v <= 0:
            raise r.fail(
                f"{key}.{pattern}", f"must be a positive {'integer' if integer else 'number'}"
            )
        out.append((str(pattern), v))
    return tuple(out)


def parse_adapter_config(name: str, file: str, raw: Any) -> AdapterSpec:
    """Validate a parsed adapter_config.json and build the AdapterSpec."""
    if not isinstance(raw, Mapping):
        raise AdapterConfigError(name, "must be a JSON object", file=file)
    r = _Reader(name, file, raw)
    family, strategy, legacy = _family(r)
    task = raw.get("task_type")
    if task not in _SERVED_TASKS:
        raise UnsupportedAdapterError(
            name,
            f"task_type {task!r} is not served (CAUSAL_LM, QUESTION_ANS are)",
            file=file,
            key="task_type",
        )
    targets, from_keys = _targets(r, legacy)
    lora = _lora_settings(r, raw)
    dora = r.flag("use_dora")
    if family is AdapterFamily.LORA:
        _check_peft_options(r)
        return AdapterSpec(
            name=name,
            family=family,
            routing_strategy=None,
            target_modules=targets,
            lora=lora,
            expert_lora=lora,
            layers=_layers(r),
            rank_pattern=_patterns(r, "rank_pattern", integer=True),  # type: ignore[arg-type]
            alpha_pattern=_patterns(r, "alpha_pattern", integer=False),
            targets_from_keys=from_keys,
            dora_without_magnitude=dora,
        )
    if from_keys:
        raise r.fail("target_modules", "must list module names for MoE-PEFT adapters")
    assert strategy is not None
    num_experts = r.integer("num_experts", None, low=1)
    expert_lora = lora
    block = raw.get("expert_lora")
    if family is AdapterFamily.MIXLORA and block is not None:
        if not isinstance(block, Mapping):
            raise r.fail("expert_lora", f"must be an object, got {block!r}")
        expert_lora = _lora_settings(r, {**raw, **block}, key_prefix="expert_lora.")
    fields: dict[str, Any] = {}
    rule = STRATEGY_RULE[strategy]
    if rule is RoutingRule.TOP_K:
        fields["top_k"] = r.integer("top_k", 2, low=1)
        if fields["top_k"] > num_experts:
            raise r.fail("top_k", f"{fields['top_k']} exceeds num_experts {num_experts}")
    elif rule is RoutingRule.TOP_P:
        fields["top_p"] = r.number("top_p", 0.8, low=0.0, high=1.0, low_open=True)
        fields["temperature"] = r.number("temperature", 0.0, low=0.0)
    elif rule is RoutingRule.DYNMOLE:
        fields["top_p"] = r.number("top_p", 0.75, low=0.0, high=1.0, low_open=True)
        fields["entropy_threshold"] = r.number("entropy_threshold", 0.9, low=0.0, low_open=True)
        fields["entropy_index"] = r.number("entropy_index", 1.1, low=0.0, high=2.0, low_open=True)
        fields["entropy_eps"] = r.number("entropy_eps", 1e-5, low=0.0, low_open=True)
        fields["keep_top_k"] = r.integer("keep_top_k", 2, low=1)
        entropy_type = raw.get("entropy_type", "tsallis")
        if entropy_type not in ("tsallis", "renyi"):
            raise r.fail("entropy_type", f"must be 'tsallis' or 'renyi', got {entropy_type!r}")
        fields["entropy_renyi"] = entropy_type == "renyi"
    if family is AdapterFamily.MIXLORA:
        act_fn = raw.get("act_fn")
        if act_fn is not None:
            from transformers.activations import ACT2FN

            if not isinstance(act_fn, str) or act_fn not in ACT2FN:
                raise r.fail("act_fn", f"unknown activation {act_fn!r}")
        fields["act_fn"] = act_fn
    return AdapterSpec(
        name=name,
        family=family,
        routing_strategy=strategy,
        target_modules=targets,
        lora=lora,
        expert_lora=expert_lora,
        num_experts=num_experts,
        rule=rule,
        key_prefix=FAMILY_KEY_PREFIX[family],
        legacy_names=legacy,
        dora_without_magnitude=dora,
        **fields,
    )
