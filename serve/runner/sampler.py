"""Next-token sampling: an all-greedy fast path, else temperature / top-k / top-p per row.

Seeded rows draw from a generator keyed on (seed, output position) only, so a request's output
does not depend on what else shares its batch, nor on being recomputed after preemption.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mixserve.types import SamplingParams

_SEED_STRIDE = 1_000_003  # spreads (seed, position) pairs over generator seeds


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[V] float32 logits -> probabilities after temperature, top-k and top-p."""
    scaled = logits / params.temperature
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], output_positions: Sequence[int]
) -> list[int]:
    """logits [N, V] float32 -> N token ids; output_positions[i] = tokens row i has generated."""
    if all(p.greedy for p in params):
        return logits.argmax(dim=-1).tolist()
    tokens: list[int] = []
    for row, (p, position) in enumerate(zip(params, output_positions, strict=True)):
        if p.greedy:
            tokens.append(int(logits[row].argmax()))
            continue
        probs = _filtered_probs(logits[row], p)
        generator = None
        if p.seed is not None:
            generator = torch.Generator(device=logits.device)
            generator.manual_seed((p.seed * _SEED_STRIDE + position) % (2**63 - 1))
        tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
    return tokens
