"""Triton routing: logits, masked softmax and every slot rule in one launch.

Grid ``(cdiv(N, BLOCK_N),)``: a program owns BLOCK_N rows. Each row gathers its slot's router
rows (E padded to a power of two, masked to the slot's ``num_experts``) and reduces the fp32
product with x over K in BLOCK_K chunks; rows of one block may belong to different slots, so the
product is an elementwise multiply-reduce over a ``[BLOCK_N, E_PAD, BLOCK_K]`` tile rather than a
``tl.dot`` (routers are tiny and stay in L2). The selection rules need sorted ranks and prefix
masses; with E small these come from an ``[E_PAD, E_PAD]`` pairwise comparison per row:
``j`` precedes ``e`` when ``key[j] > key[e]`` or the keys tie and ``j < e``, which is exactly the
order of the reference's stable descending sort. Every rule is evaluated for the block and each
row keeps its own rule's result, so a batch mixing rules and expert counts is one launch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mixserve.kernels.routing.params import RoutingParams, RoutingRule

_TOP_K = tl.constexpr(int(RoutingRule.TOP_K))
_TOP_P = tl.constexpr(int(RoutingRule.TOP_P))
_SWITCH = tl.constexpr(int(RoutingRule.SWITCH))
_DENSE = tl.constexpr(int(RoutingRule.DENSE))
_DYNMOLE = tl.constexpr(int(RoutingRule.DYNMOLE))


@triton.jit
def _entropy(p, valid, n_exp, q, eps, renyi):
    """Normalised Shannon / Tsallis / Renyi entropy of p + eps over the valid experts.

    p, valid [BN, EP]; n_exp, q, eps, renyi [BN]. Mirrors reference._normalised_entropy; a
    zero p + eps (eps = 0) contributes 0 instead of the reference's NaN.
    """
    p_eps = p + eps[:, None]
    live = valid & (p_eps > 0)
    log_p = tl.log(tl.where(live, p_eps, 1.0))
    n = n_exp.to(tl.float32)
    log_n = tl.log(n)
    shannon = -tl.sum(tl.where(live, p_eps * log_p, 0.0), axis=1) / log_n
    q_safe = tl.where(q == 1.0, 2.0, q)
    # (p + eps) ** q as exp(q log(p + eps)): p + eps > 0 wherever it counts.
    power_sum = tl.sum(tl.where(live, tl.exp(q_safe[:, None] * log_p), 0.0), axis=1)
    n_pow = tl.exp((1.0 - q_safe) * log_n)
    tsallis = ((1.0 - power_sum) / (q_safe - 1.0)) / ((1.0 - n_pow) / (q_safe - 1.0))
    renyi_h = (tl.log(power_sum + 1e-10) / (1.0 - q_safe)) / log_n
    generalised = tl.where(renyi != 0, renyi_h, tsallis)
    return tl.where(q == 1.0, shannon, generalised)


@triton.jit
def _route_kernel(
    x_ptr,  # [N, K] any float dtype
    slot_ptr,  # [N] int64
    router_ptr,  # [S, E, K] float32
    out_ptr,  # [N, E] float32
    rule_ptr,  # [S] per-slot params from here on
    n_exp_ptr,
    top_k_ptr,
    top_p_ptr,
    temp_ptr,
    thresh_ptr,
    q_ptr,
    renyi_ptr,  # uint8 view of the bool tensor
    eps_ptr,
    keep_k_ptr,
    N,
    K,
    E,
    stride_xn,
    stride_xk,
    stride_rs,
    stride_re,
    stride_rk,
    stride_on,
    BLOCK_N: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    slot = tl.load(slot_ptr + rows64, mask=row_ok, other=0)  # [BN]
    experts = tl.arange(0, E_PAD)  # [EP]
    n_exp = tl.load(n_exp_ptr + slot, mask=row_ok, other=0)
    valid = (experts[None, :] < n_exp[:, None]) & (experts[None, :] < E) & row_ok[:, None]

    # logits [BN, EP] = x . router[slot]^T in fp32, K in chunks.
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows64[:, None] * stride_xn  # [BN, 1]
    r_rows = router_ptr + slot[:, None, None] * stride_rs + experts[None, :, None] * stride_re
    logits = tl.zeros((BLOCK_N, E_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        k_ok = kk < K
        xt = tl.load(x_rows + kk[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :])
        wt = tl.load(r_rows + kk[None, None, :] * stride_rk, mask=valid[:, :, None] & k_ok)
        logits += tl.sum(xt.to(tl.float32)[:, None, :] * wt.to(tl.float32), axis=2)

    # Masked softmax; masked experts get exactly 0 (rows with no expert stay all-zero).
    logits = tl.where(valid, logits, float("-inf"))
    top = tl.max(logits, axis=1)
    top = tl.where(top == float("-inf"), 0.0, top)
    ex = tl.where(valid, tl.exp(logits - top[:, None]), 0.0)
    total = tl.sum(ex, axis=1)
    p = ex / tl.where(total > 0, total, 1.0)[:, None]  # [BN, EP]

    rule = tl.load(rule_ptr + slot, mask=row_ok, other=0)
    top_k = tl.load(top_k_ptr + slot, mask=row_ok, other=0)
    top_p = tl.load(top_p_ptr + slot, mask=row_ok, other=0.0)
    temp = tl.load(temp_ptr + slot, mask=row_ok, other=0.0)
    thresh = tl.load(thresh_ptr + slot, mask=row_ok, other=0.0)
    q = tl.load(q_ptr + slot, mask=row_ok, other=0.0)
    renyi = tl.load(renyi_ptr + slot, mask=row_ok, other=0)
    eps = tl.load(eps_ptr + slot, mask=row_ok, other=0.0)
    keep_k = tl.load(keep_k_ptr + slot, mask=row_ok, other=0)

    # TOP_P ranks the temperature-divided probabilities; dividing by one positive number keeps
    # the order, but ranking the same values as the reference also keeps its exact ties.
    scaled = (rule == _TOP_P) & (temp > 0)
    key = tl.where(scaled[:, None], p / tl.where(scaled, temp, 1.0)[:, None], p)  # [BN, EP]
    key_e = key[:, :, None]  # [BN, EP(e), 1]
    key_j = key[:, None, :]  # [BN, 1, EP(j)]
    tie_first = experts[None, None, :] < experts[None, :, None]
    precedes = (key_j > key_e) | ((key_j == key_e) & tie_first)  # j sorts before e
    rank = tl.sum(precedes.to(tl.int32), axis=2)  # [BN, EP] position in the sorted order
    mass_before = tl.sum(tl.where(precedes, key_j, 0.0), axis=2)  # exclusive prefix mass

    # TOP_K: the k best, renormalised.
    chosen = tl.where(rank < top_k[:, None], p, 0.0)
    chosen_sum = tl.sum(chosen, axis=1)
    w_top_k = chosen / tl.where(chosen_sum > 0, chosen_sum, 1.0)[:, None]
    # TOP_P: every rank whose preceding mass is still <= top_p (so the crossing one too).
    w_top_p = tl.where(mass_before <= top_p[:, None], key, 0.0)
    # SWITCH: the first rank, weight p_max.
    w_switch = tl.where(rank == 0, p, 0.0)
    # DYNMOLE: inclusive prefix mass strictly within top_p, at least keep_top_k; every expert
    # when the entropy switch fires.
    inside = (mass_before + p) <= top_p[:, None]
    keep = inside | (rank < keep_k[:, None])
    # Other rules' rows get harmless stand-ins (n = 2, q = 2) so no lane divides by zero.
    dyn = rule == _DYNMOLE
    entropy = _entropy(p, valid, tl.where(dyn, n_exp, 2), tl.where(dyn, q, 2.0), eps, renyi)
    broadcast = (q > 0) & (thresh < 1.0) & (entropy > thresh)
    w_dynmole = tl.where((keep | broadcast[:, None]) & valid, p, 0.0)

    r = rule[:, None]
    weights = tl.where(r == _TOP_K, w_top_k, 0.0)
    weights = tl.where(r == _TOP_P, w_top_p, weights)
    weights = tl.where(r == _SWITCH, w_switch, weights)
    weights = tl.where(r == _DENSE, p, weights)
    weights = tl.where(r == _DYNMOLE, w_dynmole, weights)
    out_ok = row_ok[:, None] & (experts[None, :] < E)
    tl.store(out_ptr + rows64[:, None] * stride_on + experts[None, :], weights, mask=out_ok)


def _block_sizes(num_experts: int, hidden: int) -> tuple[int, int, int]:
    """(BLOCK_N, E_PAD, BLOCK_K) keeping the [BLOCK_N, E_PAD, BLOCK_K] tile near 8K elements
    and the [BLOCK_N, E_PAD, E_PAD] rank tile near 16K. The interpreter runs programs one after
    another, so there fewer, wider blocks are faster."""
    e_pad = triton.next_power_of_2(max(num_experts, 2))
    rows = 64 if os.environ.get("TRITON_INTERPRET") == "1" else 16
    block_n = max(1, min(rows, 16384 // (e_pad * e_pad)))
    block_k = max(16, min(triton.next_power_of_2(max(hidden, 1)), 8192 // (block_n * e_pad)))
    return block_n, e_pad, block_k


def route(
    x: torch.Tensor,
    slot_ids: torch.Tensor,
    router: torch.Tensor,
    params: RoutingParams,
) -> torch.Tensor:
    """Same contract as ``mixserve.kernels.routing.route``. Rows whose slot holds no routed rule
    get all-zero weights (no host sync to raise, unlike the reference)."""
    num_rows, hidden = x.shape
    num_experts = router.shape[1]
    out = torch.empty((num_rows, num_experts), dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return out
    block_n, e_pad, block_k = _block_sizes(num_experts, hidden)
    renyi = params.entropy_renyi
    renyi = renyi.view(torch.uint8) if renyi.dtype == torch.bool else renyi
    grid = (triton.cdiv(num_rows, block_n),)
    _route_kernel[grid](
        x,
        slot_ids,
        router,
        out,
        params.rule,
        params.num_experts,
        params.top_k,
        params.top_p,
        params.temperature,
        params.entropy_threshold,
        params.entropy_index,
        renyi,
        params.entropy_eps,
        params.keep_top_k,
        num_rows,
        hidden,
        num_experts,
        x.stride(0),
        x.stride(1),
        router.stride(0),
        router.stride(1),
        router.stride(2),
        out.stride(0),
        BLOCK_N=block_n,
        E_PAD=e_pad,
        BLOCK_K=block_k,
    )
    return out
