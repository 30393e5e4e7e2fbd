"""MixLoRA's routed experts through the compiled CPU kernel (cpu.cpp: AVX-512, float32).

Same function as the reference (kernels/moe_lora_ffn/__init__.py's formulas). The kernel makes
one pass per selected (row, expert) pair over that expert's weights, in group order, keeping
the whole chain in registers: no [pairs, I] temporaries, no gathers, no per-op dispatch. It
reads the adapter pool's storage directly, so it takes only that layout (gate's and up's A in
one [.., in, 2, R] storage, every B stored transposed, down's A stored [.., I, R]); `why_not`
names what it does not take and the dispatcher then runs the reference.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch

from mixserve.kernels import _cpu_build
from mixserve.kernels.lora.joint import joint_lora_a

if TYPE_CHECKING:
    from mixserve.kernels.moe_lora_ffn import ExpertLora

RANKS = (8, 16, 32, 64)  # the ranks cpu.cpp instantiates
VECTOR = 16  # float32 lanes per AVX-512 register: H and I must be multiples


def module() -> ModuleType | None:
    """The compiled CPU kernels where this machine builds and runs them, else None."""
    return _cpu_build.module()


def joint_or_reason(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    gate: ExpertLora,
    up: ExpertLora,
    down: ExpertLora,
    act: object,
) -> torch.Tensor | str:
    """Gate's and up's A as one [G, 2R, H] view (`joint_lora_a`) where the kernel computes this
    call, else the reason it does not: the dispatcher checks and gets the view in one pass."""
    rank, intermediate = gate.lora_a.shape[2], gate.lora_b.shape[2]
    checks = (
        (isinstance(act, torch.nn.SiLU) or act is torch.nn.functional.silu, "activation not SiLU"),
        (x.device.type == "cpu" and x.dtype == torch.float32, "x not float32 on CPU"),
        (gate.lora_a.dtype == torch.float32, "adapter weights not float32"),
        (rank in RANKS, f"rank {rank} not in {RANKS}"),
        (x.shape[1] % VECTOR == 0 and intermediate % VECTOR == 0, "H or I not a multiple of 16"),
        (
            all(p.lora_b.mT.is_contiguous() for p in (gate, up, down))
            and down.lora_a.mT.is_contiguous(),
            "B or down's A not in the pool's transposed layout",
        ),
        (weights.dtype == torch.float32, "routing weights not float32"),
        (rows.dtype == torch.int64 and slots.dtype == torch.int64, "rows or slots not int64"),
    )
    reason = _cpu_build.first_failure(checks)
    if reason is not None:
        return reason
    joint = joint_lora_a(gate.lora_a, up.lora_a)
    return "gate/up A not in one storage" if joint is None else joint


def why_not(*args: object) -> str | None:
    """None where the kernel computes this call (joint_or_reason's arguments), else the reason
    it does not."""
    got = joint_or_reason(*args)  # type: ignore[arg-type]
    return got if isinstance(got, str) else None


def moe_lora_ffn(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    rows: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    gate: ExpertLora,
    up: ExpertLora,
    down: ExpertLora,
    joint: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], gate_up [T, 2I] float32; rows, slots [N] int64; weights [N, E] float32 (0 = not
    selected); joint: joint_or_reason's view, if the caller has it. Returns hidden [N, I] and
    down_delta [N, H] float32. The caller checked `why_not` and `module()`."""
    kernel = module()
    assert kernel is not None
    if joint is None:
        joint = joint_lora_a(gate.lora_a, up.lora_a)
    assert joint is not None
    hidden, down_delta = kernel.moe_lora_ffn(
        x.contiguous(),
        gate_up.contiguous(),
        rows.contiguous(),
        slots.contiguous(),
        weights.contiguous(),
        joint.mT,  # [G, H, 2R], contiguous in the pool
        gate.lora_b.mT.flatten(0, 1),  # [G, R, I]
        up.lora_b.mT.flatten(0, 1),
        down.lora_a.mT.flatten(0, 1),  # [G, I, R]
        down.lora_b.mT.flatten(0, 1),  # [G, R, H]
        gate.scale.float().contiguous(),
        up.scale.float().contiguous(),
        down.scale.float().contiguous(),
    )
    return hidden, down_delta
