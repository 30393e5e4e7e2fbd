"""Pure-torch routing: every rule is evaluated on [N, E] tensors, then chosen per row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixserve.kernels._grouped import RowRuns, row_runs, segment_matmul
from mixserve.kernels.routing.params import RoutingParams, RoutingRule

_TOP_K, _TOP_P, _SWITCH = int(RoutingRule.TOP_K), int(RoutingRule.TOP_P), int(RoutingRule.SWITCH)
_DENSE, _DYNMOLE = int(RoutingRule.DENSE), int(RoutingRule.DYNMOLE)


def _sorted_keep_to_mask(keep_sorted: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(keep_sorted)
    return mask.scatter(-1, order, keep_sorted)


def _top_k(probs: torch.Tensor, keep_by_rank: torch.Tensor) -> torch.Tensor:
    """keep_by_rank [N, E] bool: sorted rank < the row's k."""
    _, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep = _sorted_keep_to_mask(keep_by_rank, order)
    selected = probs * keep
    return selected / selected.sum(dim=-1, keepdim=True)


def _top_p(probs: torch.Tensor, top_p: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    scaled = torch.where(
        temperature[:, None] > 0, probs / temperature.clamp_min(1e-30)[:, None], probs
    )
    sorted_p, order = torch.sort(scaled, dim=-1, descending=True, stable=True)
    cumulative = sorted_p.cumsum(dim=-1)
    # A rank is kept while the mass before it is still within top_p: every rank with c <= top_p
    # plus the first one past it. If no rank passes top_p, every expert is kept.
    before = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=-1)
    keep = _sorted_keep_to_mask(before <= top_p[:, None], order)
    return scaled * keep


def _switch(probs: torch.Tensor) -> torch.Tensor:
    p_max, expert = probs.max(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, expert, p_max)


def _normalised_entropy(
    probs: torch.Tensor,
    valid: torch.Tensor,
    num_experts: torch.Tensor,
    q: torch.Tensor,
    eps: torch.Tensor,
    renyi: torch.Tensor,
) -> torch.Tensor:
    p = probs + eps[:, None]
    n = num_experts.to(torch.float32)
    log_n = torch.log(n)
    shannon = -(torch.where(valid, p * torch.log(p), 0.0)).sum(-1) / log_n
    q_safe = torch.where(q == 1.0, 2.0, q)
    power_sum = torch.where(valid, p ** q_safe[:, None], 0.0).sum(-1)
    tsallis = ((1 - power_sum) / (q_safe - 1)) / ((1 - n ** (1 - q_safe)) / (q_safe - 1))
    renyi_h = (torch.log(power_sum + 1e-10) / (1 - q_safe)) / log_n
    generalised = torch.where(renyi, renyi_h, tsallis)
    return torch.where(q == 1.0, shannon, generalised)


def _dynmole(
    probs: torch.Tensor, valid: torch.Tensor, params_rows: dict[str, torch.Tensor]
) -> torch.Tensor:
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    cumulative = sorted_p.cumsum(dim=-1)
    ranks = torch.arange(probs.shape[-1], device=probs.device)
    keep_sorted = (cumulative <= params_rows["top_p"][:, None]) | (
        ranks[None, :] < params_rows["keep_top_k"][:, None]
    )
    keep = _sorted_keep_to_mask(keep_sorted, order)
    entropy = _normalised_entropy(
        probs,
        valid,
        params_rows["num_experts"],
        params_rows["entropy_index"],
        params_rows["entropy_eps"],
        params_rows["entropy_renyi"],
    )
    broadcast_on = (params_rows["entropy_index"] > 0) & (params_rows["entropy_threshold"] < 1.0)
    broadcast = broadcast_on & (entropy > params_rows["entropy_threshold"])
    keep = keep | broadcast[:, None]
    return probs * (keep & valid)


@dataclass(frozen=True, slots=True)
class _RowSettings:
    """What routing needs of each row's slot besides x: the same in every layer of a step."""

    group_range: tuple[int, int]  # (lowest slot, span) of slot_ids
    # Long runs of consecutive rows of one slot (prefill chunks): their logits are plain GEMMs
    # on row slices against that slot's router alone. None: no run (decode rows).
    slot_runs: RowRuns | None
    rest_range: tuple[int, int] | None  # (lowest slot, span) of the rows outside the runs
    valid: torch.Tensor  # [N, E] bool: experts the row's slot has
    rules: tuple[int, ...]  # the rules present, in RoutingRule order
    rule_masks: dict[int, torch.Tensor]  # rule -> [N, 1] bool (only when several are present)
    rows: dict[str, torch.Tensor]  # per-row settings of the present rules, by field name
    top_k_keep: torch.Tensor | None  # [N, E] bool: sorted ranks below the row's k (TOP_K)


_RULE_FIELDS = {
    _TOP_K: (),
    _TOP_P: ("top_p", "temperature"),
    _SWITCH: (),
    _DENSE: (),
    _DYNMOLE: (
        "top_p",
        "keep_top_k",
        "num_experts",
        "entropy_index",
        "entropy_eps",
        "entropy_renyi",
        "entropy_threshold",
    ),
}


def _row_settings(
    slot_ids: torch.Tensor, params: RoutingParams, num_experts_max: int
) -> _RowSettings:
    slot_lo = int(slot_ids.min())
    span = int(slot_ids.max()) + 1 - slot_lo
    row_ids = torch.arange(slot_ids.shape[0], device=slot_ids.device)
    slot_runs = row_runs(row_ids, slot_ids)
    rest_range = None
    if slot_runs is not None and slot_runs.rest is not None:
        rest_slots = slot_ids.index_select(0, slot_runs.rest)
        rest_lo = int(rest_slots.min())
        rest_range = (rest_lo, int(rest_slots.max()) + 1 - rest_lo)
    ranks = torch.arange(num_experts_max, device=slot_ids.device)
    valid = ranks[None, :] < params.num_experts[slot_ids][:, None]
    rule_rows = params.rule[slot_ids]
    rules = tuple(sorted(set(torch.unique(rule_rows).tolist())))
    unknown = set(rules) - set(_RULE_FIELDS)
    if unknown:
        raise ValueError(f"routing rule(s) {sorted(unknown)} are not routed rules")
    masks = {r: (rule_rows == r)[:, None] for r in rules} if len(rules) > 1 else {}
    fields = {name for r in rules for name in _RULE_FIELDS[r]}
    per_row = {name: getattr(params, name)[slot_ids] for name in sorted(fields)}
    top_k_keep = None
    if _TOP_K in rules:
        top_k_keep = ranks[None, :] < params.top_k[slot_ids][:, None]
    return _RowSettings(
        (slot_lo, span), slot_runs, rest_range, valid, rules, masks, per_row, top_k_keep
    )


def _router_logits(
    x: torch.Tensor, router: torch.Tensor, slot_ids: torch.Tensor, settings: _RowSettings
) -> torch.Tensor:
    """[N, E] float32: x[i] @ router[slot_ids[i]].T. Rows in slot runs take one GEMM per run;
    the others one GEMM over their slot range or sorted segments (segment_matmul), which for
    prefill rows multiplies every row by every router of the range (bench/RESULTS.md, session
    28: a 951-token step's routing 26-27 -> 22-23 ms over 30 layers, its chunks over ~10
    adapters)."""
    x = x.to(torch.float32)
    by_slot = router.transpose(1, 2)  # [S, H, E]
    runs = settings.slot_runs
    if runs is None:
        return segment_matmul(x, by_slot, slot_ids, group_range=settings.group_range)
    logits = x.new_empty(x.shape[0], router.shape[1])
    for row_lo, row_hi, _, slot in runs.runs:
        torch.mm(x[row_lo:row_hi], by_slot[slot].to(x.dtype), out=logits[row_lo:row_hi])
    if runs.rest is not None:
        rest = runs.rest
        logits[rest] = segment_matmul(
            x.index_select(0, rest),
            by_slot,
            slot_ids.index_select(0, rest),
            group_range=settings.rest_range,
        )
    return logits


def route(
    x: torch.Tensor,
    slot_ids: torch.Tensor,
    router: torch.Tensor,
    params: RoutingParams,
    memo: dict[str, object] | None = None,
) -> torch.Tensor:
    """memo: see the wrapper; holds the _RowSettings of slot_ids, with the slot_ids and params
    objects they were built from: a call with other objects rebuilds them (so a memo handed to
    other rows costs a rebuild, never a wrong routing; in-place changes stay the caller's)."""
    num_rows, num_experts_max = x.shape[0], router.shape[1]
    if num_rows == 0:
        return torch.zeros((0, num_experts_max), dtype=torch.float32, device=x.device)
    memoized = memo.get("row_settings") if memo is not None else None
    if isinstance(memoized, tuple) and memoized[0] is slot_ids and memoized[1] is params:
        settings = memoized[2]
    else:
        settings = _row_settings(slot_ids, params, num_experts_max)
        if memo is not None:
            memo["row_settings"] = (slot_ids, params, settings)
    logits = _router_logits(x, router, slot_ids, settings)  # [N, E]
    valid = settings.valid
    probs = torch.softmax(logits.masked_fill_(~valid, float("-inf")), dim=-1)
    rows = settings.rows
    weights = None
    for rule in settings.rules:
        if rule == _TOP_K:
            assert settings.top_k_keep is not None
            chosen = _top_k(probs, settings.top_k_keep)
        elif rule == _TOP_P:
            chosen = _top_p(probs, rows["top_p"], rows["temperature"])
        elif rule == _SWITCH:
            chosen = _switch(probs)
        elif rule == _DENSE:
            chosen = probs
        else:
            chosen = _dynmole(probs, valid, rows)
        if weights is None and not settings.rule_masks:
            weights = chosen  # the step's only rule
        else:
            weights = torch.where(
                settings.rule_masks[rule], chosen, weights if weights is not None else 0.0
            )
    assert weights is not None
    return weights
