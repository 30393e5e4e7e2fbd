"""Compiled CPU kernels: C++ sources built once per machine with torch's extension builder.

The sources are compiled together at first use with ``-march=native`` (their AVX-512 paths exist
only where the CPU has them) into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, else
``~/.cache/torch_extensions``), under a name that hashes the sources, the flags, the torch
version and install, and this CPU's feature flags, so an edited source, another torch or a
cache directory shared with another CPU model never reuses a stale binary. Building needs a C++
compiler and ninja (a dependency); where either is missing or the build fails, `module` returns
None (with one warning) and the ops keep their torch references. ``MIXSERVE_CPU_KERNELS=0``
turns the compiled kernels off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

ENV = "MIXSERVE_CPU_KERNELS"
CFLAGS = ("-O3", "-march=native", "-fopenmp")
# at::parallel_for is inline OpenMP in torch's headers: without -fopenmp it runs on one thread.
# The link resolves libgomp.so.1 to the copy torch already loaded (same soname): one runtime.
LDFLAGS = ("-fopenmp",)


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_flags() -> str:
    """This CPU's feature flags (Linux), so binaries built for one CPU model stay with it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


KERNELS_DIR = Path(__file__).resolve().parent
# Every compiled CPU kernel, built as one extension: torch's headers are compiled once, and one
# cache entry and one log line cover them all. The prelude (first) holds what they share; each
# kernel defines its functions for AVX-512 and, without it, stubs that raise.
SOURCES = ("cpu_prelude.cpp", "moe_lora_ffn/cpu.cpp", "lora/cpu.cpp")
FUNCTIONS = ("avx512", "moe_lora_ffn", "lora_sites")


def first_failure(checks: Iterable[tuple[bool, str]]) -> str | None:
    """The reason of the first failed (passed, reason) check, None where all passed: a kernel's
    `why_not`."""
    return next((reason for passed, reason in checks if not passed), None)


def module() -> ModuleType | None:
    """The compiled CPU kernels where they are enabled, built and run here (AVX-512), else
    None (the ops then run their torch references)."""
    if not enabled():
        return None
    built = build(tuple(KERNELS_DIR / source for source in SOURCES), FUNCTIONS)
    return built if built is not None and built.avx512() else None


@functools.cache
def build(sources: tuple[Path, ...], functions: tuple[str, ...]) -> ModuleType | None:
    """The extension of these C++ sources (one translation unit, in order) exporting
    `functions`, or None where it cannot be built here (logged once). Safe to call from several
    processes at once: torch's builder holds a lock on the build directory."""
    texts = [source.read_text(encoding="utf-8") for source in sources]
    # The torch install too: its include paths are in the build file, so two environments
    # sharing one name would rebuild over each other at every start.
    install = os.path.dirname(torch.__file__)
    flags = " ".join(CFLAGS + LDFLAGS)
    key = "\0".join((*texts, flags, torch.__version__, install, _cpu_flags(), *functions))
    name = f"mixserve_cpu_kernels_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    label = ", ".join(f"{source.parent.name}/{source.name}" for source in sources)
    started = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline(
            name,
            cpp_sources=texts,
            functions=list(functions),
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
        )
    except (ImportError, OSError, RuntimeError) as exc:
        logger.warning(
            "CPU kernels (%s) not built (%s: %s); the torch references run instead",
            label,
            type(exc).__name__,
            str(exc).strip().splitlines()[-1] if str(exc).strip() else "",
        )
        return None
    logger.info("CPU kernels (%s) ready in %.1f s", label, time.perf_counter() - started)
    return module
