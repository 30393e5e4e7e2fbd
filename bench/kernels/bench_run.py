"""What every kernel benchmark script does around its own measurements: the common command-line
options, the run's settings (device, dtype, repeats, output path, timer, measured peaks), and the
JSON record with date, device, versions and command."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from device_timing import (
    DTYPES,
    RESULTS,
    TOLERANCE,
    Peaks,
    Timer,
    check_device,
    measure_peaks,
    package_version,
)


def add_common_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat; runs on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--repeats", type=int, help="timed calls per figure (20; smoke 1)")
    parser.add_argument("--out", help=f"JSON path (bench/results/{name}.json)")


@dataclass(frozen=True, slots=True)
class Run:
    name: str  # results file stem, e.g. kernels_moe_lora_layer
    smoke: bool
    device: torch.device
    dtype_name: str
    dtype: torch.dtype
    repeats: int
    out_path: str
    timer: Timer

    def measure_peaks(self) -> Peaks:
        if self.smoke:
            return measure_peaks(self.timer, self.dtype, copy_bytes=16 << 20, matmul_n=256)
        return measure_peaks(self.timer, self.dtype, copy_bytes=1 << 30, matmul_n=8192)

    def write(self, impl: str, peaks: Peaks, against: str, details: dict[str, Any]) -> None:
        """The JSON record: the run's identity, then `details` (config, targets, rows...)."""
        on_gpu = self.device.type == "cuda"
        record = {
            "date": time.strftime("%Y-%m-%d"),
            "device": torch.cuda.get_device_name(self.device)
            if on_gpu
            else f"cpu {platform.machine()}",
            "torch": torch.__version__,
            "triton": package_version("triton"),
            "kernels": impl,
            "env": {k: os.environ.get(k) for k in ("MIXSERVE_KERNELS", "TRITON_INTERPRET")},
            "command": f"python bench/kernels/{os.path.basename(sys.argv[0])} "
            + " ".join(sys.argv[1:]),
            "dtype": self.dtype_name,
            "repeats": self.repeats,
            "peaks": asdict(peaks),
            "cross_check": {"passed": True, "tolerance": TOLERANCE[self.dtype], "against": against},
            **details,
        }
        os.makedirs(os.path.dirname(os.path.abspath(self.out_path)), exist_ok=True)
        with open(self.out_path, "w") as f:
            json.dump(record, f, indent=2)
        sys.stdout.write(f"wrote {self.out_path}\n")


def start_run(args: argparse.Namespace, name: str) -> Run:
    """Check the device (exits with a message when it cannot give meaningful figures) and fix
    the run's settings; smoke runs get a `_smoke` results name and no warm-up."""
    device = torch.device(args.device)
    check_device(device, args.smoke)
    repeats = args.repeats or (1 if args.smoke else 20)
    name += "_smoke" if args.smoke else ""
    return Run(
        name=name,
        smoke=args.smoke,
        device=device,
        dtype_name=args.dtype,
        dtype=DTYPES[args.dtype],
        repeats=repeats,
        out_path=args.out or os.path.join(RESULTS, f"{name}.json"),
        timer=Timer(device, repeats, warmup=0 if args.smoke else 3),
    )
