"""Where a serving run's time goes, step by step: serving_throughput's workload (256 requests,
100 MixLoRA adapters, the engine's default slots) with every engine step timed.

Per variant it reports the wall time, and the steps split into prefill steps (any prompt token)
and decode-only steps, and separately the steps that started while an adapter load was running
(on CPU such a step gives one torch thread to the load worker). Variants:
  base          — no adapters;
  uniform, zipf — adapters registered, each read from disk on first use (serving_throughput's);
  uniform_warm, zipf_warm — every adapter in the host tier before the run.

    python bench/serving_steps.py [--variants base,uniform,uniform_warm] [--requests 256]
        [--adapters 100] [--max-tokens 32] [--slots N] [--out F]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from machine import write_record  # noqa: E402 - bench/, the script's folder
from serving_throughput import _workload, write_bench_adapters  # noqa: E402
from support.adapter_files import BaseDims  # noqa: E402

import mixserve  # noqa: E402
from mixserve.engine import StepReport  # noqa: E402
from mixserve.model.default_model import default_model_dir  # noqa: E402
from mixserve.types import SamplingParams  # noqa: E402

VARIANTS = ("base", "uniform", "zipf", "uniform_warm", "zipf_warm")


# The StepReport fields each step's record keeps.
STEP_FIELDS = ("num_prompt_tokens", "num_sequences", "num_adapters", "num_loads_running", "seconds")


def _timed_run(llm: mixserve.LLM, work: dict, adapters: list, params: SamplingParams) -> dict:
    engine = llm.engine
    steps: list[StepReport] = []
    step = engine.step

    def recorded_step():
        deltas = step()
        if engine.last_report.ran:
            steps.append(engine.last_report)
        return deltas

    engine.step = recorded_step  # this engine only
    try:
        start = time.perf_counter()
        outs = llm.generate(
            prompt_token_ids=work["prompts"], sampling_params=params, adapter=adapters
        )
        wall = time.perf_counter() - start
    finally:
        # The closure refers to the engine: left in place, the cycle would keep this variant's
        # engine, load worker and host tier alive into the next variant's run.
        del engine.step
    tokens = sum(len(o.token_ids) for o in outs)

    def split(selected: list[StepReport]) -> dict:
        return {"steps": len(selected), "seconds": sum(s.seconds for s in selected)}

    decode = [s for s in steps if s.num_prompt_tokens == 0]
    return {
        "tokens": tokens,
        "wall_seconds": wall,
        "tokens_per_s": tokens / wall,
        "prefill": split([s for s in steps if s.num_prompt_tokens]),
        "decode": split(decode),
        "with_loads": split([s for s in steps if s.num_loads_running]),
        "decode_median_seconds": statistics.median(s.seconds for s in decode) if decode else 0,
        "decode_mean_sequences": statistics.mean(s.num_sequences for s in decode) if decode else 0,
        "steps": [{field: getattr(s, field) for field in STEP_FIELDS} for s in steps],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=None, help="default: the engine's sizing")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "serving_steps.json")
    )
    args = parser.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    model_dir = default_model_dir()
    from transformers import AutoConfig

    dims = BaseDims.of(AutoConfig.from_pretrained(model_dir))
    work = _workload(args.requests, args.adapters)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = write_bench_adapters(tmp, dims, args.adapters)
        for variant in variants:
            popularity = variant.removesuffix("_warm")
            options: dict = {
                "max_num_seqs": args.max_num_seqs,
                "max_num_batched_tokens": args.max_num_batched_tokens,
            }
            if variant != "base":
                options.update(max_lora_rank=8, max_experts=4, num_adapter_slots=args.slots)
            if variant.endswith("_warm"):
                options["adapters"] = adapter_dirs
            llm = mixserve.LLM(model_dir, **options)
            if variant in ("uniform", "zipf"):
                for name, path in adapter_dirs.items():
                    llm.engine.pager.add_source(name, path)
            adapters = [None] * len(work["prompts"]) if variant == "base" else work[popularity]
            results[variant] = _timed_run(llm, work, adapters, params)
            if llm.engine.pager is not None:
                results[variant]["num_slots"] = llm.engine.pager.pool.num_slots
            del llm
            gc.collect()  # nothing of this variant's engine runs beside the next
    header = f"{'variant':<14}{'tok/s':>7}{'wall s':>8}  prefill steps/s  decode steps/s"
    lines = [header + "  (median, mean seqs)  steps with a load running"]
    for variant, r in results.items():
        p, d, w = r["prefill"], r["decode"], r["with_loads"]
        lines.append(
            f"{variant:<14}{r['tokens_per_s']:>7.1f}{r['wall_seconds']:>8.1f}"
            f"  {p['steps']:>5} {p['seconds']:>6.1f}   {d['steps']:>5} {d['seconds']:>6.1f}"
            f"  ({r['decode_median_seconds']:.3f}, {r['decode_mean_sequences']:.1f})"
            f"  {w['steps']:>5} {w['seconds']:>6.1f}"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    write_record(args.out, {"results": results})


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
