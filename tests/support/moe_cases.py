"""MixLoRA expert-FFN cases in the adapter pool's layout, and a float64 per-row loop to check
kernels against (tests/kernels/test_moe_lora_ffn*.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixserve.kernels import ExpertLora, joint_lora_a


def expert_lora(gen, slots, experts, rank, din, dout, dtype, ranks, pool_layout=True):
    """pool_layout: A and B as views of the pool's [.., in, R] and [.., R, out] storage
    (moe_case then joins gate's and up's A as the pool does); otherwise both contiguous as named
    ([.., R, in], [.., out, R])."""
    a = torch.randn(slots, experts, rank, din, generator=gen) / din**0.5
    b = torch.randn(slots, experts, dout, rank, generator=gen) / rank**0.5
    for s, r in enumerate(ranks):  # zero-padded ranks, as the pool stores them
        a[s, :, r:] = 0
        b[s, :, :, r:] = 0
    scale = torch.rand(slots * experts, generator=gen) + 0.5
    a, b = a.to(dtype), b.to(dtype)
    if pool_layout:
        a, b = a.mT.contiguous().mT, b.mT.contiguous().mT
    return ExpertLora(a, b, scale)


def naive_moe(x, gate_up, rows, slots, weights, gate, up, down):
    """Per row, per selected expert, in float64: sum_e w (W_d h_e + s B_d A_d h_e) - W_d part."""
    inter = gate_up.shape[1] // 2
    experts = weights.shape[1]
    hidden = torch.zeros(len(rows), inter, dtype=torch.float64)
    delta = torch.zeros(len(rows), x.shape[1], dtype=torch.float64)
    for i, (t, s) in enumerate(zip(rows.tolist(), slots.tolist(), strict=True)):
        xt = x[t].double()
        for e in range(experts):
            w = float(weights[i, e])
            if w <= 0:
                continue
            g_idx = s * experts + e

            def lora(p: ExpertLora, v: torch.Tensor, g: int = g_idx) -> torch.Tensor:
                a, b = p.lora_a.flatten(0, 1)[g].double(), p.lora_b.flatten(0, 1)[g].double()
                return float(p.scale[g]) * (b @ (a @ v))

            g = gate_up[t, :inter].double() + lora(gate, xt)
            u = gate_up[t, inter:].double() + lora(up, xt)
            h = F.silu(g) * u
            hidden[i] += w * h
            delta[i] += w * lora(down, h)
    return hidden, delta


def moe_case(
    seed,
    *,
    tokens,
    slots_used,
    num_slots,
    experts,
    k,
    dtype,
    one_slot=False,
    pool_layout=True,
    hidden_size=24,
    inter=40,
    rank=16,
):
    """(x, gate_up, rows, slots, weights, gate, up, down): rows a random 3/4 of the tokens, each
    on one of slots_used, top-k routing; per-slot ranks zero-padded up to rank."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden_size, generator=gen).to(dtype)
    gate_up = torch.randn(tokens, 2 * inter, generator=gen).to(dtype)
    rows = torch.randperm(tokens, generator=gen)[: max(1, tokens * 3 // 4)]
    if one_slot:
        slots = torch.full((len(rows),), slots_used[0])
    else:
        slots = torch.tensor(slots_used)[
            torch.randint(0, len(slots_used), (len(rows),), generator=gen)
        ]
    logits = torch.randn(len(rows), experts, generator=gen)
    top = logits.topk(k, dim=-1)
    weights = torch.zeros(len(rows), experts).scatter(1, top.indices, top.values.softmax(-1))
    ranks = [max(1, rank - 4 * (3 - s % 4)) for s in range(num_slots)]
    shapes = ((hidden_size, inter), (hidden_size, inter), (inter, hidden_size))
    gate, up, down = (
        expert_lora(gen, num_slots, experts, rank, din, dout, dtype, ranks, pool_layout)
        for din, dout in shapes
    )
    if pool_layout:  # gate's and up's A share one [.., in, 2, R] storage, as in the pool
        joint = torch.stack([gate.lora_a.mT, up.lora_a.mT], dim=-2)  # [S, E, in, 2, R]
        gate = ExpertLora(joint[..., 0, :].mT, gate.lora_b, gate.scale)
        up = ExpertLora(joint[..., 1, :].mT, up.lora_b, up.scale)
        assert joint_lora_a(gate.lora_a, up.lora_a) is not None
    return x, gate_up, rows, slots, weights, gate, up, down
