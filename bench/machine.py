"""The machine line every bench result records.

CPU ratios differ between machines of the same size (bench/RESULTS.md, session 19: the same code
measured 1.57-1.68x on an Intel Xeon VM and 1.40x on an AMD EPYC VM), so the CPU model is part
of every result, not only the architecture and core count.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(extra: str = "") -> str:
    """e.g. 'x86_64 AMD EPYC, 2 cpus, torch 2.13.0+cpu, 2 threads'."""
    line = (
        f"{platform.machine()} {cpu_model()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    return f"{line}, {extra}" if extra else line


def write_record(out_path: str, fields: dict, machine_extra: str = "") -> None:
    """Write a bench run's JSON record (its date, machine and command line as run, then fields)
    to out_path, and say where."""
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": describe(machine_extra),
        "command": f"python bench/{os.path.basename(sys.argv[0])} " + " ".join(sys.argv[1:]),
        **fields,
    }
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(record, f, indent=2)
    sys.stdout.write(f"wrote {out_path}\n")
