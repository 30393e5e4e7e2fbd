"""Paged attention of one 7B layer (32 query and KV heads of 128, blocks of 16): achieved GB/s
and TFLOP/s against the device's measured peaks, and two torch baselines.

Cases: decode batches B = 1..256 at one context length (default 2048; one new token each, blocks
shuffled as a long-running cache leaves them) and one 4096-token prefill. Per case: the op as
the model calls it (eager and, on CUDA, replayed from a CUDA graph), mixserve's torch reference
(gather the blocks, masked SDPA), and SDPA over a contiguous cache (no paging: what the same
bytes cost without a block table). GB/s counts K/V of every cached token once plus q and the
output. Before timing, the op and the contiguous SDPA are checked against the reference.

    python bench/kernels/paged_attention.py [--context 2048] [--kv-heads 32] [--repeats 20]
    TRITON_INTERPRET=1 MIXSERVE_KERNELS=triton python bench/kernels/paged_attention.py --smoke
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from bench_run import add_common_arguments, start_run
from device_timing import (
    TOLERANCE,
    Peaks,
    Timer,
    cuda_graph,
    rel_err,
    us,
)

from mixserve.kernels import paged_attention
from mixserve.kernels._dispatch import use_triton
from mixserve.kernels.paged_attention import reference

logger = logging.getLogger("bench.kernels")


@dataclass(frozen=True, slots=True)
class AttnConfig:
    heads: int  # Hq
    kv_heads: int  # Hkv
    head_dim: int  # D
    block_size: int
    decode_batches: tuple[int, ...]
    prefill_tokens: int


FULL = AttnConfig(32, 32, 128, 16, (1, 8, 32, 64, 128, 256), 4096)
SMOKE = AttnConfig(4, 2, 16, 4, (1, 3), 8)


@dataclass(frozen=True, slots=True)
class AttnRow:
    phase: str
    batch: int  # B sequences
    context: int  # cached tokens per sequence after the step
    bytes: int
    flops: int
    eager_ms: float
    graph_ms: float | None
    gbps: float  # from the graph time when there is one, else eager
    bw_pct: float
    tflops: float
    flop_pct: float
    reference_ms: float
    contiguous_sdpa_ms: float
    speedup_vs_reference: float
    rel_err: float
    sdpa_rel_err: float


@dataclass(frozen=True, slots=True)
class Step:
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [NB, BS, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, MB] int32, shuffled blocks
    query_lens: list[int]
    seq_lens: list[int]
    k_dense: torch.Tensor  # [B, Hkv, L, D] the same keys, contiguous
    v_dense: torch.Tensor


def make_step(
    cfg: AttnConfig,
    batch: int,
    context: int,
    queries: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Step:
    gen = torch.Generator(device=device).manual_seed(batch * 7919 + context)
    blocks_per_seq = -(-context // cfg.block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, cfg.block_size, cfg.kv_heads, cfg.head_dim)
    k_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    order = torch.randperm(num_blocks, generator=gen, device=device)
    tables = order.view(batch, blocks_per_seq).to(torch.int32)  # [B, MB]

    def dense(cache: torch.Tensor) -> torch.Tensor:  # [B, Hkv, L, D]
        rows = cache[tables.long()].flatten(1, 2)[:, :context]  # [B, L, Hkv, D]
        return rows.transpose(1, 2).contiguous()

    q = torch.randn(batch * queries, cfg.heads, cfg.head_dim, generator=gen, device=device)
    return Step(
        q=q.to(dtype),
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=tables,
        query_lens=[queries] * batch,
        seq_lens=[context] * batch,
        k_dense=dense(k_cache),
        v_dense=dense(v_cache),
    )


def contiguous_sdpa(step: Step, scale: float) -> torch.Tensor:
    batch, queries = len(step.query_lens), step.query_lens[0]
    q = step.q.view(batch, queries, *step.q.shape[1:]).transpose(1, 2)  # [B, Hq, Q, D]
    out = F.scaled_dot_product_attention(
        q, step.k_dense, step.v_dense, is_causal=queries > 1, scale=scale, enable_gqa=True
    )  # [B, Hq, Q, D]; causal prefill: the chunk is the whole sequence
    return out.transpose(1, 2).flatten(0, 1)


def measure(
    cfg: AttnConfig,
    phase: str,
    batch: int,
    context: int,
    timer: Timer,
    peaks: Peaks,
    dtype: torch.dtype,
) -> AttnRow:
    queries = 1 if phase == "decode" else context
    step = make_step(cfg, batch, context, queries, dtype, timer.device)
    scale = cfg.head_dim**-0.5
    args = (step.q, step.k_cache, step.v_cache, step.block_tables, step.query_lens, step.seq_lens)

    def op() -> torch.Tensor:
        return paged_attention(*args, scale=scale)

    def ref() -> torch.Tensor:
        return reference.paged_attention(*args, scale=scale, sliding_window=None)

    want = ref()
    err, sdpa_err = rel_err(op(), want), rel_err(contiguous_sdpa(step, scale), want)
    if max(err, sdpa_err) > TOLERANCE[dtype]:
        sys.exit(
            f"cross-check failed at {phase} B={batch} L={context}: relative error vs the "
            f"reference: op {err:.2e}, contiguous SDPA {sdpa_err:.2e}; tolerance "
            f"{TOLERANCE[dtype]:.0e}"
        )
    logger.info("%s B=%d L=%d: cross-check ok (%.1e, %.1e)", phase, batch, context, err, sdpa_err)
    eager_ms = timer.ms(op)
    replay = cuda_graph(op, timer.device) if use_triton(step.q) else None
    graph_ms = timer.ms(replay) if replay is not None else None
    ref_ms = timer.ms(ref)
    sdpa_ms = timer.ms(lambda: contiguous_sdpa(step, scale))
    item = step.q.element_size()
    tokens = batch * queries
    moved = (2 * batch * context * cfg.kv_heads + 2 * tokens * cfg.heads) * cfg.head_dim * item
    keys_seen = batch * (queries * context - queries * (queries - 1) // 2)  # causal pairs
    flops = 4 * cfg.heads * cfg.head_dim * keys_seen
    seconds = (graph_ms if graph_ms is not None else eager_ms) * 1e-3
    gbps, tflops = moved / seconds / 1e9, flops / seconds / 1e12
    return AttnRow(
        phase=phase,
        batch=batch,
        context=context,
        bytes=moved,
        flops=flops,
        eager_ms=eager_ms,
        graph_ms=graph_ms,
        gbps=gbps,
        bw_pct=100 * gbps / peaks.bandwidth_gbps,
        tflops=tflops,
        flop_pct=100 * tflops / peaks.matmul_tflops,
        reference_ms=ref_ms,
        contiguous_sdpa_ms=sdpa_ms,
        speedup_vs_reference=ref_ms / eager_ms,
        rel_err=err,
        sdpa_rel_err=sdpa_err,
    )


def table(rows: list[AttnRow]) -> str:
    lines = [
        "| phase | B | L | MB | eager us | graph us | GB/s | % BW | TFLOP/s | % FLOP "
        "| reference us | x reference | contiguous SDPA us |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.phase} | {r.batch} | {r.context} | {r.bytes / 1e6:.1f} | {us(r.eager_ms)} "
            f"| {us(r.graph_ms)} | {r.gbps:.0f} | {r.bw_pct:.1f} | {r.tflops:.2f} "
            f"| {r.flop_pct:.1f} | {us(r.reference_ms)} | {r.speedup_vs_reference:.3g} "
            f"| {us(r.contiguous_sdpa_ms)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_arguments(parser, "kernels_paged_attention")
    parser.add_argument("--context", type=int, help="decode context length (2048; smoke 10)")
    parser.add_argument("--kv-heads", type=int, help="KV heads (32, llama-2-7b; 8 for GQA)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    run = start_run(args, "kernels_paged_attention")
    cfg = SMOKE if args.smoke else FULL
    if args.kv_heads:
        cfg = replace(cfg, kv_heads=args.kv_heads)
    context = args.context or (10 if args.smoke else 2048)
    with torch.inference_mode():
        peaks = run.measure_peaks()
        impl = "triton" if use_triton(torch.empty(0, device=run.device)) else "reference"
        cases = [("decode", b, context) for b in cfg.decode_batches]
        cases.append(("prefill", 1, cfg.prefill_tokens))
        rows = [measure(cfg, p, b, n, run.timer, peaks, run.dtype) for p, b, n in cases]
    sys.stdout.write(table(rows) + "\n")
    details = {
        "config": {**asdict(cfg), "decode_context": context},
        "rows": [asdict(r) for r in rows],
    }
    run.write(impl, peaks, "reference", details)


if __name__ == "__main__":
    main()
