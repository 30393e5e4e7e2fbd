"""The machine line every bench result records.

CPU ratios differ between machines of the same size (bench/RESULTS.md, session 19: the same code
measured 1.57-1.68x on an Intel Xeon VM and 1.40x on an AMD EPYC VM), so the CPU model is part
of every result, not only the architecture and core count.
"""

from __future__ import annotations

import os
import platform

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
