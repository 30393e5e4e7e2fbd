"""One model step on CPU with SmolLM2: base model vs 8 MixLoRA adapters mixed in the batch.

Steps (same tokens for every variant):
  mixed  — 256 tokens: 8 decode tokens (context 128, one sequence per adapter) plus 4 fresh
           prompts of 62 tokens (adapters 0-3), in one forward pass;
  decode — 32 sequences (context 128), one token each, 4 per adapter.
Variants: mixserve base only; mixserve with 8 MixLoRA adapters (E=8, top-2, r=16, all 7
targets); the authors' `mixlora` package on a transformers model, one adapter at a time (the
only way it runs), its tokens batched within each adapter (decodes with their KV cache, prompts
as one batch). Prints a table and writes JSON.

    python bench/model_step.py [--repeats 5] [--out bench/results/model_step.json]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from machine import write_record  # noqa: E402 - bench/, the script's folder
from support.adapter_files import BaseDims, write_adapter  # noqa: E402
from support.reference_mixlora import inject_mixlora  # noqa: E402

from mixserve.adapters import AdapterPool, PoolShape, load_adapter  # noqa: E402
from mixserve.model import load_model  # noqa: E402
from mixserve.model.default_model import default_model_dir  # noqa: E402
from mixserve.runner import ModelRunner  # noqa: E402
from mixserve.types import SamplingParams, ScheduledSequence, SchedulerOutput  # noqa: E402

logger = logging.getLogger("bench.model_step")
NUM_ADAPTERS, CONTEXT, BLOCK = 8, 128, 16
GREEDY = SamplingParams(temperature=0, max_tokens=1)


def _median_seconds(
    fn: Callable[[], object], repeats: int, setup: Callable[[], None] | None = None
) -> float:
    if setup is not None:
        setup()
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Workload:
    """Token ids and block tables of both steps; contexts are prefilled once, outside timing."""

    def __init__(self, vocab: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.contexts = [
            torch.randint(100, vocab, (CONTEXT,), generator=gen).tolist() for _ in range(32)
        ]
        self.next_tokens = torch.randint(100, vocab, (32,), generator=gen).tolist()
        self.prompts = [torch.randint(100, vocab, (62,), generator=gen).tolist() for _ in range(4)]
        blocks_per_ctx = (CONTEXT + 1 + BLOCK - 1) // BLOCK
        self.ctx_blocks = [
            tuple(range(i * blocks_per_ctx, (i + 1) * blocks_per_ctx)) for i in range(32)
        ]
        first = 32 * blocks_per_ctx
        self.prompt_blocks = [tuple(range(first + i * 4, first + (i + 1) * 4)) for i in range(4)]
        self.num_blocks = first + 16

    @staticmethod
    def adapter_of(i: int, with_adapters: bool) -> str | None:
        return f"a{i % NUM_ADAPTERS}" if with_adapters else None

    def prefill_plan(self, with_adapters: bool) -> SchedulerOutput:
        return SchedulerOutput(
            tuple(
                ScheduledSequence(
                    i,
                    tuple(self.contexts[i]),
                    0,
                    self.ctx_blocks[i],
                    self.adapter_of(i, with_adapters),
                    False,
                    GREEDY,
                )
                for i in range(32)
            )
        )

    def decode_plan(self, with_adapters: bool, count: int = 32) -> list[ScheduledSequence]:
        return [
            ScheduledSequence(
                i,
                (self.next_tokens[i],),
                CONTEXT,
                self.ctx_blocks[i],
                self.adapter_of(i, with_adapters),
                True,
                GREEDY,
            )
            for i in range(count)
        ]

    def mixed_plan(self, with_adapters: bool) -> SchedulerOutput:
        decodes = self.decode_plan(with_adapters, NUM_ADAPTERS)
        prompts = [
            ScheduledSequence(
                100 + i,
                tuple(p),
                0,
                self.prompt_blocks[i],
                self.adapter_of(i, with_adapters),
                True,
                GREEDY,
            )
            for i, p in enumerate(self.prompts)
        ]
        return SchedulerOutput(tuple(decodes + prompts))


def _paired(
    base: Callable[[], object], other: Callable[[], object], repeats: int
) -> tuple[float, float, float]:
    """Alternate the two steps so machine drift hits both alike: (median base s, median other s,
    median of the per-pair ratios other / base)."""
    base(), other()
    pairs = []
    for _ in range(repeats):
        start = time.perf_counter()
        base()
        middle = time.perf_counter()
        other()
        pairs.append((middle - start, time.perf_counter() - middle))
    ratios = [o / b for b, o in pairs]
    return (
        statistics.median(b for b, _ in pairs),
        statistics.median(o for _, o in pairs),
        statistics.median(ratios),
    )


def bench_mixserve(model_dir: str, adapter_dirs: list[str], work: Workload, repeats: int) -> dict:
    model = load_model(model_dir)
    weights = [load_adapter(f"a{i}", d, model.arch) for i, d in enumerate(adapter_dirs)]
    shape = PoolShape.covering([w.spec for w in weights], model.arch.num_layers)
    pool = AdapterPool(model.arch, shape, NUM_ADAPTERS, model.dtype, model.device)
    slots = {}
    for i, w in enumerate(weights):
        pool.load(i, w)
        slots[w.name] = i
    runner = ModelRunner(model, work.num_blocks, BLOCK, pool)
    # KV contents do not change the cost of a step; the cache is filled once with adapter KV.
    runner.compute_logits(work.prefill_plan(True), slots)
    results: dict[str, dict[str, float]] = {"mixserve_base": {}, "mixserve_8_mixlora": {}}
    for step in ("mixed", "decode"):
        plans = {}
        for with_adapters in (False, True):
            if step == "mixed":
                plans[with_adapters] = work.mixed_plan(with_adapters)
            else:
                plans[with_adapters] = SchedulerOutput(tuple(work.decode_plan(with_adapters)))
        assert plans[True].num_tokens == (256 if step == "mixed" else 32)
        base_s, adapter_s, ratio = _paired(
            lambda p=plans[False]: runner.execute(p, slots),
            lambda p=plans[True]: runner.execute(p, slots),
            repeats,
        )
        results["mixserve_base"][step] = base_s
        results["mixserve_8_mixlora"][step] = adapter_s
        results["mixserve_8_mixlora"][f"{step}_paired_ratio"] = ratio
    return results


def bench_mixlora_package(
    model_dir: str, adapter_dirs: list[str], work: Workload, repeats: int
) -> dict:
    from support.tiny_models import load_reference

    base = load_reference(model_dir)
    totals = {"mixed": 0.0, "decode": 0.0}
    for a, adapter_dir in enumerate(adapter_dirs):
        model = inject_mixlora(copy.deepcopy(base), adapter_dir)
        seqs = [i for i in range(32) if i % NUM_ADAPTERS == a]
        with torch.no_grad():
            ctx = model(
                torch.tensor([work.contexts[i] for i in seqs]), use_cache=True
            ).past_key_values
            ctx_one = model(torch.tensor([work.contexts[a]]), use_cache=True).past_key_values
            state: dict = {}

            def fresh(state: dict = state, ctx: object = ctx, ctx_one: object = ctx_one) -> None:
                state["ctx"], state["one"] = copy.deepcopy(ctx), copy.deepcopy(ctx_one)

            next_ids = torch.tensor([[work.next_tokens[i]] for i in seqs])
            one_id = torch.tensor([[work.next_tokens[a]]])
            prompt = torch.tensor([work.prompts[a]]) if a < len(work.prompts) else None

            def decode(m=model, ids=next_ids, s=state) -> None:
                m(ids, past_key_values=s["ctx"], use_cache=True)

            def mixed(m=model, one=one_id, p=prompt, s=state) -> None:
                m(one, past_key_values=s["one"], use_cache=True)
                if p is not None:
                    m(p)

            totals["decode"] += _median_seconds(decode, repeats, fresh)
            totals["mixed"] += _median_seconds(mixed, repeats, fresh)
        del model
    return {"mixlora_package_per_adapter": totals}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "model_step.json")
    )
    parser.add_argument("--skip-package", action="store_true", help="skip the mixlora package")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    model_dir = default_model_dir()
    dims = BaseDims.of(_hf_config(model_dir))
    work = Workload(vocab=49152)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = [
            write_adapter(
                os.path.join(tmp, f"a{i}"),
                dims,
                "mixlora",
                r=16,
                num_experts=8,
                top_k=2,
                seed=i,
                delta_scale=0.1,
                router_scale=1.0,
            )
            for i in range(NUM_ADAPTERS)
        ]
        results = bench_mixserve(model_dir, adapter_dirs, work, args.repeats)
        if not args.skip_package:
            results.update(bench_mixlora_package(model_dir, adapter_dirs, work, args.repeats))
    base = results["mixserve_base"]
    lines = [
        f"{'variant':<30}{'mixed 256 tok (ms)':>20}{'x base':>8}{'decode 32 (ms)':>16}{'x base':>8}"
    ]
    for name, r in results.items():
        # mixserve's adapter ratio is the median of interleaved pairs; the package's is plain.
        mixed_x = r.get("mixed_paired_ratio", r["mixed"] / base["mixed"])
        decode_x = r.get("decode_paired_ratio", r["decode"] / base["decode"])
        lines.append(
            f"{name:<30}{r['mixed'] * 1e3:>20.1f}{mixed_x:>8.2f}"
            f"{r['decode'] * 1e3:>16.1f}{decode_x:>8.2f}"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    write_record(args.out, {"results_seconds": results})


def _hf_config(model_dir: str) -> object:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


if __name__ == "__main__":
    main()
