"""MixLoRA's whole-FFN experts for routed rows, from the shared base gate/up projections.

For routed row i (token t = rows[i], slot s = slots[i]) and expert e with weight w = weights[i, e]:

    g_e = gate_up[t, :I] + scale_g B_g A_g x[t]        u_e = gate_up[t, I:] + scale_u B_u A_u x[t]
    h_e = act(g_e) * u_e
    hidden[i]     = sum_e w h_e                  (the caller runs the base down projection once)
    down_delta[i] = sum_e w scale_d B_d A_d h_e  (the routed down-LoRA deltas)

(A, B, scale of slot s and expert e at each projection.) Experts with weight 0 contribute nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mixserve.kernels._dispatch import take_compiled_cpu, use_compiled_cpu, use_triton
from mixserve.kernels.moe_lora_ffn import reference


@dataclass(frozen=True, slots=True)
class ExpertLora:
    """One projection's expert LoRAs for every slot (one layer)."""

    lora_a: torch.Tensor  # [S, E, R, in]
    lora_b: torch.Tensor  # [S, E, out, R]
    scale: torch.Tensor  # [S * E] float32
    # [S * E] int32, each (slot, expert)'s true rank: rank columns past it are zero padding that
    # the Triton kernels then skip. None: every group uses all R.
    group_ranks: torch.Tensor | None = None


def moe_lora_ffn(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    gate: ExpertLora,
    up: ExpertLora,
    down: ExpertLora,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed MixLoRA experts.

    Shapes: x [T, H]; gate_up [T, 2I] (base projections); rows, slots [N] int64; weights [N, E]
    float32 (0 = not selected). Returns hidden [N, I] and down_delta [N, H] in x's dtype.
    """
    if use_triton(x):
        from mixserve.kernels.moe_lora_ffn import triton as device

        return device.moe_lora_ffn(x, gate_up, rows, slots, weights, gate, up, down, act)
    if use_compiled_cpu(x):
        from mixserve.kernels.moe_lora_ffn import cpu

        got = cpu.joint_or_reason(x, gate_up, rows, slots, weights, gate, up, down, act)
        reason = got if isinstance(got, str) else None
        if take_compiled_cpu(cpu.module() is not None, reason):
            return cpu.moe_lora_ffn(x, gate_up, rows, slots, weights, gate, up, down, got)
    return reference.moe_lora_ffn(x, gate_up, rows, slots, weights, gate, up, down, act)


__all__ = ["ExpertLora", "moe_lora_ffn"]
