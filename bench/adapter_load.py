"""Adapter load cost on CPU: one MoE-PEFT MixLoRA `.bin` read, validated and stacked.

The adapter is serving_throughput.py's (SmolLM2 dims, E=4, top-2, r=8, all 7 targets, 27.3 MB
fp32, 990 tensors). Variants, each the median of --repeats runs after one warm-up:
  torch.load   — torch.load(weights_only=True) of the file alone, with and without mmap;
  in-process   — mixserve's load_adapter on this thread (torch single-threaded, as on a worker);
  worker       — the same through a load worker process (adapters/load_worker.py), as the
                 engine loads: pickles over a pipe, tensors back as raw bytes.

    python bench/adapter_load.py [--repeats 9] [--out bench/results/adapter_load.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from machine import write_record  # noqa: E402 - bench/, the script's folder
from model_step import _median_seconds  # noqa: E402 - the benches' one timing helper
from support.adapter_files import BaseDims, write_adapter  # noqa: E402

from mixserve.adapters import load_adapter  # noqa: E402
from mixserve.adapters.process_loader import ProcessLoader  # noqa: E402
from mixserve.model import load_arch  # noqa: E402
from mixserve.model.default_model import default_model_dir  # noqa: E402
from mixserve.torch_threads import single_threaded_torch  # noqa: E402


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    return _median_seconds(fn, repeats) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "adapter_load.json")
    )
    args = parser.parse_args()
    single_threaded_torch()
    model_dir = default_model_dir()
    from transformers import AutoConfig

    dims = BaseDims.of(AutoConfig.from_pretrained(model_dir))
    arch = load_arch(model_dir)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_adapter(
            os.path.join(tmp, "a0"),
            dims,
            "mixlora",
            r=8,
            num_experts=4,
            seed=0,
            delta_scale=0.1,
            router_scale=1.0,
        )
        weights_file = os.path.join(path, "adapter_model.bin")
        for mmap in (False, True):
            results[f"torch.load mmap={mmap}"] = _median_ms(
                lambda m=mmap: torch.load(weights_file, weights_only=True, mmap=m), args.repeats
            )
        results["load_adapter in-process"] = _median_ms(
            lambda: load_adapter("a0", path, arch), args.repeats
        )
        worker = ProcessLoader(1)
        try:
            results["load_adapter through a worker"] = _median_ms(
                lambda: worker("a0", path, arch), args.repeats
            )
        finally:
            worker.close()
        size_mb = os.path.getsize(weights_file) / 2**20
    lines = [f"adapter: {size_mb:.1f} MB .bin", f"{'variant':<34}{'ms':>8}"]
    lines += [f"{name:<34}{ms:>8.1f}" for name, ms in results.items()]
    sys.stdout.write("\n".join(lines) + "\n")
    write_record(args.out, {"file_mb": size_mb, "median_ms": results})
    sys.stdout.write(f"wrote {args.out}\n")


if __name__ == "__main__":
    main()
