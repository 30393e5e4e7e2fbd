"""Per-token expert routing for MoE-LoRA adapters, gathered from each token's adapter slot.

The selection rules are the MoE-PEFT ones (docs in `mixlora_spec.md` §2):

- ``TOP_K``: softmax, top-k, renormalised over the selected experts (`mixlora`, MoLA).
- ``TOP_P``: softmax, optionally divided by a temperature (the probabilities, as the authors
  do), the smallest prefix of the sorted experts whose mass exceeds top_p; not renormalised
  (`mixlora-dynamic`).
- ``SWITCH``: the argmax expert with weight p_max, no capacity at inference (`mixlora-switch`).
- ``DENSE``: every expert with its softmax probability (LoRAMoE).
- ``DYNMOLE``: experts strictly inside top_p, at least keep_top_k; every expert when the
  normalised Tsallis (or Renyi) entropy of the distribution exceeds the threshold; weights are
  the raw probabilities (DynMoLE).
"""

from __future__ import annotations

import torch

from mixserve.kernels._dispatch import use_triton
from mixserve.kernels.routing import reference
from mixserve.kernels.routing.params import RoutingParams, RoutingRule


def route(
    x: torch.Tensor,
    slot_ids: torch.Tensor,
    router: torch.Tensor,
    params: RoutingParams,
    memo: dict[str, object] | None = None,
) -> torch.Tensor:
    """Routing weights of each row under its slot's router and rule.

    Semantics: ``logits[i] = float32(x[i]) @ router[slot_ids[i]]^T``, experts at or beyond the
    slot's ``num_experts`` masked out, ``p = softmax(logits)`` in float32, then the slot's
    ``RoutingRule``. Unselected experts get weight 0.

    Shapes: x [N, K] (any float dtype); slot_ids [N] int64, every slot routed (rule != NONE);
    router [S, E, K] float32. Returns [N, E] float32.

    memo: an optional dict for calls that share slot_ids and params (every layer of a step): the
    CPU reference keeps its per-row settings there, built on the first call and reused while
    the same slot_ids and params objects come back (other objects rebuild them), so those must
    not change in place while it is in use. The Triton version reads each row's settings in the
    kernel and ignores it.
    """
    if use_triton(x):
        # Imported on first use: triton reads TRITON_INTERPRET when the kernels are defined.
        from mixserve.kernels.routing import triton as triton_impl

        return triton_impl.route(x, slot_ids, router, params)
    return reference.route(x, slot_ids, router, params, memo)


__all__ = ["RoutingParams", "RoutingRule", "route"]
