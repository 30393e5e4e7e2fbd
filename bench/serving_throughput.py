"""Offline throughput on CPU with SmolLM2: base only, many MixLoRA adapters, the authors' package.

256 requests (prompts of 24-64 tokens, 32 generated tokens each, ignore_eos) through
`mixserve.LLM`, in rounds of the three variants (--rounds, default 2: medians are reported):
  base     — no adapters;
  uniform  — 100 MixLoRA adapters (E=4, top-2, r=8, all 7 targets: ~28 MB fp32 each, the
             size of mixlora_spec.md's SmolLM2 example), adapter drawn uniformly per request;
  zipf     — the same 100 adapters with Zipf(1.0) popularity;
  *_warm   — with --warm, the same with every adapter in the host tier before the run.
`LLM.generate` hands the engine each call's requests grouped by adapter (llm.submission_order);
outputs come back in the prompts' order.
Adapter slots: --slots, else the engine's default sizing (64 here: max_num_seqs, within the
2 GiB default slot budget); the count used is in the results.
The authors' `mixlora` package (0.2.3) serves one adapter at a time: for each adapter used, a
fresh copy of the transformers model gets it injected, and that adapter's prompts are generated
as one left-padded batch with `generate` (greedy). Its time includes switching adapters.
Also reports disk-to-ready load time (read + validate + copy into a slot) of one adapter,
through a load worker process (the engine's path) and in-process.

    python bench/serving_throughput.py [--requests 256] [--adapters 100] [--max-tokens 32]
    python bench/serving_throughput.py --device cuda --dtype bfloat16 --skip-package \
        --adapters 32 --slots 32      # and --adapters 128 --slots 128 (issue: Triton kernels)
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from machine import write_record  # noqa: E402 - bench/, the script's folder
from support.adapter_files import BaseDims, write_adapter  # noqa: E402
from support.reference_mixlora import inject_mixlora  # noqa: E402

import mixserve  # noqa: E402
from mixserve.adapters import AdapterPool, PoolShape, load_adapter  # noqa: E402
from mixserve.adapters.process_loader import ProcessLoader  # noqa: E402
from mixserve.model.default_model import default_model_dir  # noqa: E402
from mixserve.types import SamplingParams  # noqa: E402


def _workload(num_requests: int, num_adapters: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    prompts = [
        [rng.randint(100, 49000) for _ in range(rng.randint(24, 64))] for _ in range(num_requests)
    ]
    names = [f"a{i}" for i in range(num_adapters)]
    zipf_weights = [1 / (i + 1) for i in range(num_adapters)]
    return {
        "prompts": prompts,
        "uniform": [rng.choice(names) for _ in range(num_requests)],
        "zipf": rng.choices(names, weights=zipf_weights, k=num_requests),
    }


def write_bench_adapters(folder: str, dims: BaseDims, num_adapters: int) -> dict[str, str]:
    """The bench's MixLoRA adapters (E=4, top-2, r=8, all 7 targets: ~28 MB fp32 each), by name."""
    adapter_dirs = {
        f"a{i}": write_adapter(
            os.path.join(folder, f"a{i}"),
            dims,
            "mixlora",
            r=8,
            num_experts=4,
            seed=i,
            delta_scale=0.1,
            router_scale=1.0,
        )
        for i in range(num_adapters)
    }
    # The adapters' ~2.8 GB are still being written back to disk: finish that first, or the
    # first timings share the disk and CPU with it.
    os.sync()
    return adapter_dirs


def _throughput(
    llm: mixserve.LLM, prompts: list[list[int]], adapters: list[str | None], params: SamplingParams
) -> tuple[float, int]:
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, adapter=adapters)
    seconds = time.perf_counter() - start
    return seconds, sum(len(o.token_ids) for o in outs)


def summarize_rounds(per_round: list[dict]) -> dict:
    """Per variant of rounds of (base, uniform, zipf), each variant in a fresh engine: the
    median tokens/s over the rounds and the median of its per-round ratio to that round's base
    (a VM's speed drifts by 10% or more between minutes: a ratio within one round sees one
    speed)."""
    results: dict = {"rounds": per_round}
    for variant in per_round[0]:
        rates = [r[variant]["tokens_per_s"] for r in per_round]
        ratios = [r[variant]["tokens_per_s"] / r["base"]["tokens_per_s"] for r in per_round]
        results[variant] = {
            **per_round[-1][variant],  # counts (tokens, loads, evictions): the last round's
            "seconds": statistics.median(r[variant]["seconds"] for r in per_round),
            "tokens_per_s": statistics.median(rates),
            "vs_base": statistics.median(ratios),
            "tokens_per_s_rounds": rates,
            "vs_base_rounds": ratios,
        }
    return results


def bench_mixserve(
    model_dir: str,
    adapter_dirs: dict[str, str],
    work: dict,
    params: SamplingParams,
    slots: int | None,
    device: dict[str, str],
    warm: bool = False,
) -> dict:
    results = {}
    warm_variants = (("uniform", True), ("zipf", True)) if warm else ()
    base = mixserve.LLM(model_dir, max_num_seqs=64, max_num_batched_tokens=1024, **device)
    seconds, tokens = _throughput(base, work["prompts"], [None] * len(work["prompts"]), params)
    results["base"] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
    del base
    # An engine holds reference cycles: it is freed at the next full collection, which a process
    # of this size rarely reaches on its own (the tests' tiny run peaked at 20.8 GB RSS over 10
    # engines without these collections).
    gc.collect()
    for popularity, preloaded in (("uniform", False), ("zipf", False)) + warm_variants:
        # Cold: adapters are registered, not preloaded, so the first requests of each pay its
        # disk load. Warm: LLM(adapters=...) loads them into the host tier before the run (a
        # server that has served them before); slots still start empty.
        llm = mixserve.LLM(
            model_dir,
            adapters=adapter_dirs if preloaded else None,
            max_num_seqs=64,
            max_num_batched_tokens=1024,
            max_lora_rank=8,
            max_experts=4,
            num_adapter_slots=slots,
            **device,
        )
        if not preloaded:
            for name, path in adapter_dirs.items():
                llm.engine.pager.add_source(name, path)
        before = llm.stats().pager
        seconds, tokens = _throughput(llm, work["prompts"], work[popularity], params)
        stats = llm.stats()
        results[popularity + ("_warm" if preloaded else "")] = {
            "num_slots": llm.engine.pager.pool.num_slots,
            "seconds": seconds,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "distinct_adapters": len(set(work[popularity])),
            "slot_evictions": stats.pager.slot_evictions - before.slot_evictions,
            "disk_loads": stats.pager.disk_loads - before.disk_loads,  # during the run
            "preemptions": stats.scheduler.num_preemptions,
        }
        del llm
        gc.collect()  # nothing of this variant's engine runs or stays beside the next
    return results


def bench_package(
    model_dir: str,
    adapter_dirs: dict[str, str],
    work: dict,
    params: SamplingParams,
    popularity: str,
) -> dict:
    from support.tiny_models import load_reference

    base = load_reference(model_dir)
    by_adapter: dict[str, list[list[int]]] = {}
    for prompt, name in zip(work["prompts"], work[popularity], strict=True):
        by_adapter.setdefault(name, []).append(prompt)
    tokens = 0
    start = time.perf_counter()
    for name, prompts in by_adapter.items():
        model = inject_mixlora(copy.deepcopy(base), adapter_dirs[name])
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=params.max_tokens,
                min_new_tokens=params.max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        tokens += (out.shape[1] - width) * len(prompts)
        del model
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def bench_load_time(
    model_dir: str, adapter_dir: str, device: dict[str, str], repeats: int = 9
) -> dict:
    llm = mixserve.LLM(
        model_dir,
        max_lora_rank=8,
        max_experts=4,
        num_adapter_slots=1,
        kv_cache_memory_bytes=16 * 2**20,
        **device,
    )
    arch = llm.arch
    shape = PoolShape.covering([load_adapter("x", adapter_dir, arch).spec], arch.num_layers)
    model = llm.engine.runner.model
    pool = AdapterPool(arch, shape, 1, model.dtype, model.device)
    # The engine's path: a worker process reads the files, keeping freed memory as a CPU
    # engine's workers do (build_engine).
    process_loader = ProcessLoader(1, keep_freed_memory=pool.device.type == "cpu")
    process_loader("x", adapter_dir, arch)  # the worker's start-up is not part of a load
    medians, ranges = {}, {}
    for variant, loader in (("in_process", load_adapter), ("worker_process", process_loader)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            weights = loader("x", adapter_dir, arch)
            pool.load(0, weights)
            if pool.device.type == "cuda":
                torch.cuda.synchronize(pool.device)
            times.append(time.perf_counter() - start)
        medians[variant] = statistics.median(times)
        ranges[variant] = (min(times), max(times))
    process_loader.close()
    size = sum(os.path.getsize(os.path.join(adapter_dir, f)) for f in os.listdir(adapter_dir))
    return {
        "median_seconds": medians["worker_process"],
        "in_process_median_seconds": medians["in_process"],
        "seconds_range": ranges["worker_process"],  # a load's time varies a lot on a small VM
        "in_process_seconds_range": ranges["in_process"],
        "file_mb": size / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=None, help="default: the engine's sizing")
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds of (base, uniform, zipf) for mixserve"
    )
    parser.add_argument(
        "--warm",
        action="store_true",
        help="also uniform_warm and zipf_warm: every adapter in the host tier before the run",
    )
    parser.add_argument("--skip-package", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (mixserve runs only)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "serving_throughput.json"),
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.device != "cpu" and not args.skip_package:
        parser.error("the mixlora package baseline runs on CPU only: add --skip-package")
    device = {"device": args.device, "dtype": args.dtype}
    torch.manual_seed(0)
    model_dir = default_model_dir()
    from transformers import AutoConfig

    dims = BaseDims.of(AutoConfig.from_pretrained(model_dir))
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    work = _workload(args.requests, args.adapters)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = write_bench_adapters(tmp, dims, args.adapters)
        results = {"load_time": bench_load_time(model_dir, adapter_dirs["a0"], device)}
        per_round = [
            bench_mixserve(model_dir, adapter_dirs, work, params, args.slots, device, args.warm)
            for _ in range(args.rounds)
        ]
        results.update(summarize_rounds(per_round))
        if not args.skip_package:
            for popularity in ("uniform", "zipf"):
                results[f"package_{popularity}"] = bench_package(
                    model_dir, adapter_dirs, work, params, popularity
                )
    base = results["base"]["tokens_per_s"]
    lines = [
        f"mixserve: medians of {args.rounds} rounds; vs base: the median of per-round ratios; "
        f"{results['uniform']['num_slots']} adapter slots",
        f"{'variant':<20}{'tokens/s':>10}{'vs base':>9}{'vs package':>12}  rounds (tokens/s)",
    ]
    variants = ("base", "uniform", "zipf", "uniform_warm", "zipf_warm")
    for name in (*variants, "package_uniform", "package_zipf"):
        if name not in results:
            continue
        r = results[name]
        package = results.get(f"package_{name.removesuffix('_warm')}")
        vs_package = f"{r['tokens_per_s'] / package['tokens_per_s']:.2f}x" if package else ""
        vs_base = r.get("vs_base", r["tokens_per_s"] / base)
        rounds = " / ".join(f"{t:.1f}" for t in r.get("tokens_per_s_rounds", ()))
        lines.append(
            f"{name:<20}{r['tokens_per_s']:>10.1f}{vs_base:>8.2f}x{vs_package:>12}  {rounds}"
        )
    load = results["load_time"]
    lines.append(
        f"adapter load (disk -> slot), {load['file_mb']:.1f} MB: "
        f"{load['median_seconds'] * 1e3:.0f} ms through a load worker process "
        f"({load['seconds_range'][0] * 1e3:.0f}-{load['seconds_range'][1] * 1e3:.0f}), "
        f"{load['in_process_median_seconds'] * 1e3:.0f} ms in-process "
        f"({load['in_process_seconds_range'][0] * 1e3:.0f}-"
        f"{load['in_process_seconds_range'][1] * 1e3:.0f})"
    )
    sys.stdout.write("\n".join(lines) + "\n")
    write_record(
        args.out,
        {"device": args.device, "dtype": args.dtype, "results": results},
        torch.cuda.get_device_name() if args.device == "cuda" else "",
    )


if __name__ == "__main__":
    main()
