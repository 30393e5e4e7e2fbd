"""Triton moe_lora_ffn (MixLoRA whole-FFN experts) against the reference, which runs in float32
on the CPU over the same (dtype-rounded) inputs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from lora_triton_cases import DEVICE, ON_GPU, cpu32

from mixserve.kernels import ExpertLora, moe_lora_ffn
from mixserve.kernels.moe_lora_ffn import reference
from mixserve.kernels.moe_lora_ffn import triton as device

# Relative to the largest expected value; the half-precision paths round s, the per-assignment
# gate/up rows and h before the down projection.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class FfnCase:
    tokens: int
    slots_used: tuple[int, ...]
    experts: int
    k: int  # experts per row; 0: a random number of them (top-p like)
    hidden: int = 24
    inter: int = 40
    num_slots: int = 6
    one_slot: bool = False


SMALL = {
    "one_row": FfnCase(1, (2,), 4, 1),
    "decode": FfnCase(9, (0, 3), 8, 2),
    "uneven_slots": FfnCase(40, (1, 2, 5), 6, 3),
    "one_huge_slot": FfnCase(60, (4,), 8, 2, one_slot=True),
    "16_experts_top_p": FfnCase(10, (0, 1, 2, 3, 4, 5), 16, 0),
    "no_rows": FfnCase(0, (0,), 4, 1),
}
FULL = {
    "one_row": FfnCase(1, (2,), 8, 2, hidden=2048, inter=5632),
    "decode_32_adapters": FfnCase(64, tuple(range(32)), 8, 2, 2048, 5632, num_slots=32),
    "prefill_2048": FfnCase(2048, (1, 2, 5), 16, 4, 1024, 2816),
    "one_huge_slot": FfnCase(2048, (4,), 8, 2, 1024, 2816, one_slot=True),
    "16_experts_top_p": FfnCase(512, tuple(range(32)), 16, 0, 1024, 2816, num_slots=32),
    "no_rows": FfnCase(0, (0,), 4, 1),
}
CASES = FULL if ON_GPU else SMALL
HALF_ON_CPU = ("decode",)
GRID = [
    pytest.param(name, dtype, id=f"{name}-{dtype_id}")
    for name in CASES
    for dtype, dtype_id in [
        (torch.float32, "fp32"),
        (torch.bfloat16, "bf16"),
        (torch.float16, "fp16"),
    ]
    if ON_GPU or dtype == torch.float32 or name in HALF_ON_CPU
]


def _lora(gen, case: FfnCase, din: int, dout: int, dtype: torch.dtype) -> ExpertLora:
    rank = 16
    a = torch.randn(case.num_slots, case.experts, rank, din, generator=gen) / din**0.5
    b = torch.randn(case.num_slots, case.experts, dout, rank, generator=gen) / rank**0.5
    for s in range(case.num_slots):  # zero-padded mixed ranks, as the pool stores them
        r = 4 + 4 * (s % 4)
        a[s, :, r:] = 0
        b[s, :, :, r:] = 0
    scale = torch.rand(case.num_slots * case.experts, generator=gen) + 0.5
    return ExpertLora(a.to(DEVICE, dtype), b.to(DEVICE, dtype), scale.to(DEVICE))


def make_case(case: FfnCase, dtype: torch.dtype, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.tokens, case.hidden, generator=gen)
    gate_up = torch.randn(case.tokens, 2 * case.inter, generator=gen)
    rows = torch.randperm(case.tokens, generator=gen)[: max(1, case.tokens * 3 // 4)]
    pick = torch.randint(0, len(case.slots_used), (len(rows),), generator=gen)
    slots = torch.tensor(case.slots_used)[pick * (not case.one_slot)]  # one_slot: the first
    logits = torch.randn(len(rows), case.experts, generator=gen)
    if case.k:
        top = logits.topk(case.k, dim=-1)
        weights = torch.zeros_like(logits).scatter(1, top.indices, top.values.softmax(-1))
    else:  # 1..E experts per row, not renormalised
        keep = torch.rand(len(rows), case.experts, generator=gen) < 0.3
        keep[torch.arange(len(rows)), logits.argmax(-1)] = True
        weights = logits.softmax(-1) * keep
    tensors = [t.to(DEVICE) for t in (x, gate_up, rows, slots, weights)]
    tensors[0], tensors[1] = tensors[0].to(dtype), tensors[1].to(dtype)
    experts = [
        _lora(gen, case, case.hidden, case.inter, dtype),
        _lora(gen, case, case.hidden, case.inter, dtype),
        _lora(gen, case, case.inter, case.hidden, dtype),
    ]
    return (*tensors, *experts)


def oracle(args: tuple, act) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = [cpu32(t) for t in args[:5]]
    experts = [ExpertLora(cpu32(e.lora_a), cpu32(e.lora_b), cpu32(e.scale)) for e in args[5:]]
    return reference.moe_lora_ffn(*tensors, *experts, act, shrink="grouped")


def check(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], dtype) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype and g.shape == w.shape
        scale = max(float(w.abs().max()), 1e-6) if w.numel() else 1.0
        torch.testing.assert_close(cpu32(g), w, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize(("name", "dtype"), GRID)
def test_matches_reference(name, dtype):
    args = make_case(CASES[name], dtype, seed=7 + CASES[name].tokens)
    check(moe_lora_ffn(*args, F.silu), oracle(args, F.silu), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compacted_segments_give_the_same_result(monkeypatch, dtype):
    """Past the size limit the padded segments are trimmed first (one host sync)."""
    args = make_case(CASES["uneven_slots" if not ON_GPU else "prefill_2048"], dtype, seed=3)
    want = oracle(args, F.silu)
    trimmed = []
    real = device.Segments.trimmed
    monkeypatch.setattr(device, "COMPACT_ABOVE_BYTES", 0)
    monkeypatch.setattr(device.Segments, "trimmed", lambda s: trimmed.append(1) or real(s))
    check(moe_lora_ffn(*args, F.silu), want, dtype)
    assert trimmed == [1]


def test_other_activation():
    def gelu_tanh(t: torch.Tensor) -> torch.Tensor:
        return F.gelu(t, approximate="tanh")

    args = make_case(CASES["decode"] if not ON_GPU else CASES["prefill_2048"], torch.float32, 5)
    check(moe_lora_ffn(*args, gelu_tanh), oracle(args, gelu_tanh), torch.float32)
