"""Compiled CPU kernels: C++ sources built once per machine with torch's extension builder.

A source is compiled at first use with ``-march=native`` (its AVX-512 paths exist only where the
CPU has them) into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, else
``~/.cache/torch_extensions``), under a name that hashes the source, the flags, the torch version
and this CPU's feature flags, so an edited source, a new torch or a cache directory shared with
another CPU model never reuses a stale binary. Building needs a C++ compiler and ninja (a
dependency); where either is missing or the build fails, `load` returns None once with a
warning and the ops keep their torch references. ``MIXSERVE_CPU_KERNELS=0`` turns the compiled
kernels off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
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


@functools.cache
def load(source: Path, functions: tuple[str, ...]) -> ModuleType | None:
    """The compiled module of a C++ source exporting `functions`, or None where it cannot be
    built here (logged once). Safe to call from several processes at once: torch's builder
    holds a lock on the build directory."""
    text = source.read_text(encoding="utf-8")
    key = "\0".join((text, " ".join(CFLAGS + LDFLAGS), torch.__version__, _cpu_flags(), *functions))
    stem = f"{source.parent.name}_{source.stem}"
    name = f"mixserve_{stem}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    started = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline(
            name,
            cpp_sources=[text],
            functions=list(functions),
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
        )
    except (ImportError, OSError, RuntimeError) as exc:
        logger.warning(
            "CPU kernel %s not built (%s: %s); using the torch reference instead",
            source.name,
            type(exc).__name__,
            str(exc).strip().splitlines()[-1] if str(exc).strip() else "",
        )
        return None
    logger.info("CPU kernel %s ready in %.1f s", source.name, time.perf_counter() - started)
    return module
