"""Routed LoRA sites through the compiled CPU kernel (cpu.cpp: AVX-512, float32).

Same function as `reference.lora_apply_sites`: for n sites sharing rows and segments (one site,
or q/k/v / gate/up with their A side by side), ``out[r(p), site i's columns] += coef[p, i] *
B_g,i (A_g,i x[r(p)])``. One pass per assignment, in the segments' group order, from the pool's
storage: A stored [.., in, n R] and every B stored transposed (rows may be strided). `why_not`
names what the kernel does not take; the dispatcher then runs the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from mixserve.kernels import _cpu_build
from mixserve.kernels.assignments import Segments

MAX_JOINT_RANK = 64  # n R: cpu.cpp's shrink keeps n R / 8 (at most 8) vector accumulators


def module() -> ModuleType | None:
    """The compiled CPU kernels where this machine builds and runs them, else None."""
    return _cpu_build.module()


def why_not(
    x: torch.Tensor, lora_a: torch.Tensor, lora_bs: Sequence[torch.Tensor], out: torch.Tensor
) -> str | None:
    """None where the kernel computes this call (lora_a [G, n R, in], lora_bs n x [G, out_i,
    R], out [N, sum out_i]), else the reason it does not."""
    joint_rank = lora_a.shape[1]
    checks = (
        (x.device.type == "cpu" and x.dtype == torch.float32, "x not float32 on CPU"),
        (lora_a.dtype == torch.float32 and out.dtype == torch.float32, "A or out not float32"),
        (x.stride(1) == 1 and out.stride(1) == 1, "x or out columns not contiguous"),
        (
            x.shape[1] == lora_a.shape[2] and out.shape[1] == sum(b.shape[1] for b in lora_bs),
            "shapes do not match",
        ),
        (joint_rank % 8 == 0 and joint_rank <= MAX_JOINT_RANK, f"n R = {joint_rank} unsupported"),
        (lora_a.stride(1) == 1, "A not stored [.., in, n R] as in the pool"),
        (all(b.stride(1) == 1 for b in lora_bs), "B not stored transposed as in the pool"),
    )
    return _cpu_build.first_failure(checks)


def lora_apply_sites(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bs: Sequence[torch.Tensor],
    segments: Segments,
    coef: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """x [N, in]; lora_a [G, n R, in]; lora_bs n x [G, out_i, R]; segments' P valid
    assignments; coef [P, n] float32; out [N, sum out_i], accumulated in place. The caller
    checked `why_not` and `module()`."""
    kernel = module()
    assert kernel is not None
    kernel.lora_sites(
        x,
        lora_a.mT,  # [G, in, n R], n R contiguous
        [b.mT for b in lora_bs],  # n x [G, R, out_i], out_i contiguous
        segments.row_ids,
        segments.group_ids,
        coef.reshape(segments.row_ids.shape[0], len(lora_bs)).float().contiguous(),
        out,
    )
