"""GPU only: the Triton path of a routed site and of the MixLoRA FFN never waits on the host, and
replays from a CUDA graph with fresh routing (the grids depend on shapes only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lora_triton_cases import SCENARIOS, assert_matches, cpu32, make_batch, routing
from test_moe_lora_ffn_triton import CASES as FFN_CASES
from test_moe_lora_ffn_triton import check, make_case, oracle

from mixserve.kernels import (
    Segments,
    build_segments,
    concat_segments,
    lora_expand,
    lora_shrink,
    moe_lora_ffn,
)
from mixserve.kernels.assignments import reference as segments_reference
from mixserve.kernels.lora import reference as lora_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPE = torch.bfloat16


def routed_site(weights, rows, slots, plain, batch, out) -> None:
    """One projection site: plain rows + freshly routed rows, shrink, weighted expand."""
    num_experts = weights.shape[1]
    seg = concat_segments(plain, build_segments(weights, rows, slots, num_experts))
    s = lora_shrink(batch.x, batch.lora_a, seg, group_ranks=batch.ranks)
    lora_expand(s, batch.lora_b, seg, batch.coef(seg), out, group_ranks=batch.ranks)


def site_oracle(weights, rows, slots, plain, batch) -> torch.Tensor:
    num_experts = weights.shape[1]
    routed = segments_reference.build_segments(weights.cpu(), rows.cpu(), slots.cpu(), num_experts)
    plain_cpu = Segments(plain.row_ids.cpu(), plain.group_ids.cpu(), plain.weights.cpu())
    seg = segments_reference.concat_segments(plain_cpu, routed)
    s = lora_reference.lora_shrink(cpu32(batch.x), cpu32(batch.lora_a), seg, gather_rows=True)
    out = torch.zeros(batch.x.shape[0], batch.lora_b.shape[1])
    slot_scale = cpu32(batch.slot_scale)
    coef = seg.weights * slot_scale[seg.group_ids // (batch.lora_a.shape[0] // len(slot_scale))]
    lora_reference.lora_expand(s, cpu32(batch.lora_b), seg, coef, out, scatter_rows=True)
    return out


def site_inputs(seed: int):
    sc = SCENARIOS["2048_tokens_32x16"]
    batch = make_batch(sc, DTYPE, seed=1)
    gen = torch.Generator().manual_seed(seed)
    weights, slots = routing(sc, gen)
    rows = torch.arange(sc.num_tokens)
    plain_rows = torch.arange(0, sc.num_tokens, 7)
    plain = Segments(plain_rows, torch.zeros_like(plain_rows), torch.ones(len(plain_rows)))
    plain = Segments(*(t.cuda() for t in (plain.row_ids, plain.group_ids, plain.weights)))
    return batch, weights.cuda(), rows.cuda(), slots.cuda(), plain


def test_no_host_synchronisation():
    batch, weights, rows, slots, plain = site_inputs(seed=2)
    out = torch.zeros(batch.x.shape[0], batch.lora_b.shape[1], dtype=DTYPE, device="cuda")
    ffn_args = make_case(FFN_CASES["decode_32_adapters"], DTYPE, seed=3)
    routed_site(weights, rows, slots, plain, batch, out)  # compiles the kernels
    moe_lora_ffn(*ffn_args, F.silu)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        routed_site(weights, rows, slots, plain, batch, out)
        moe_lora_ffn(*ffn_args, F.silu)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_replays_with_new_routing():
    batch, weights, rows, slots, plain = site_inputs(seed=4)
    out = torch.zeros(batch.x.shape[0], batch.lora_b.shape[1], dtype=DTYPE, device="cuda")
    ffn_args = make_case(FFN_CASES["decode_32_adapters"], DTYPE, seed=5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compiles, caches allocations
        routed_site(weights, rows, slots, plain, batch, out)
        moe_lora_ffn(*ffn_args, F.silu)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.zero_()
        routed_site(weights, rows, slots, plain, batch, out)
        hidden, delta = moe_lora_ffn(*ffn_args, F.silu)
    for seed in (6, 7):
        _, new_weights, _, new_slots, _ = site_inputs(seed)
        weights.copy_(new_weights)
        slots.copy_(new_slots)
        new_ffn = make_case(FFN_CASES["decode_32_adapters"], DTYPE, seed=seed)
        for static, fresh in zip(ffn_args[:5], new_ffn[:5], strict=True):
            static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out, site_oracle(weights, rows, slots, plain, batch), DTYPE)
        check((hidden, delta), oracle(ffn_args, F.silu), DTYPE)
