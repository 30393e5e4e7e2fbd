"""Pure-torch routing: every rule is evaluated on [N, E] tensors, then chosen per row."""

from __future__ import annotations

import torch

from mixserve.kernels._grouped import segment_matmul
from mixserve.kernels.routing.params import RoutingParams, RoutingRule

_TOP_K, _TOP_P, _SWITCH = int(RoutingRule.TOP_K), int(RoutingRule.TOP_P), int(RoutingRule.SWITCH)
_DENSE, _DYNMOLE = int(RoutingRule.DENSE), int(RoutingRule.DYNMOLE)


def _sorted_keep_to_mask(keep_sorted: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(keep_sorted)
    return mask.scatter(-1, order, keep_sorted)


def _top_k(probs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    _, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device)
    keep = _sorted_keep_to_mask(ranks[None, :] < k[:, None], order)
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


def route(
    x: torch.Tensor,
    slot_ids: torch.Tensor,
    router: torch.Tensor,
    params: RoutingParams,
) -> torch.Tensor:
    num_rows, num_experts_max = x.shape[0], router.shape[1]
    if num_rows == 0:
        return torch.zeros((0, num_experts_max), dtype=torch.float32, device=x.device)
    logits = segment_matmul(x.to(torch.float32), router.transpose(1, 2), slot_ids)  # [N, E]
    num_experts = params.num_experts[slot_ids]
    valid = torch.arange(num_experts_max, device=x.device)[None, :] < num_experts[:, None]
    probs = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    rules = params.rule[slot_ids]
    weights = torch.zeros_like(probs)
    present = set(torch.unique(rules).tolist())
    if _TOP_K in present:
        weights = torch.where(
            (rules == _TOP_K)[:, None], _top_k(probs, params.top_k[slot_ids]), weights
        )
    if _TOP_P in present:
        chosen = _top_p(probs, params.top_p[slot_ids], params.temperature[slot_ids])
        weights = torch.where((rules == _TOP_P)[:, None], chosen, weights)
    if _SWITCH in present:
        weights = torch.where((rules == _SWITCH)[:, None], _switch(probs), weights)
    if _DENSE in present:
        weights = torch.where((rules == _DENSE)[:, None], probs, weights)
    if _DYNMOLE in present:
        rows = {
            name: getattr(params, name)[slot_ids]
            for name in (
                "top_p",
                "keep_top_k",
                "num_experts",
                "entropy_index",
                "entropy_eps",
                "entropy_renyi",
                "entropy_threshold",
            )
        }
        weights = torch.where((rules == _DYNMOLE)[:, None], _dynmole(probs, valid, rows), weights)
    unknown = present - {_TOP_K, _TOP_P, _SWITCH, _DENSE, _DYNMOLE}
    if unknown:
        raise ValueError(f"routing rule(s) {sorted(unknown)} are not routed rules")
    return weights
