"""Timing, measured device peaks and shared settings of the kernel benchmarks.

On CUDA every timed call starts on an idle device with a cold L2 (a 256 MiB buffer is overwritten
and the device synchronised first: inside a whole model, the other layers evict this layer's
weights) and is bracketed by CUDA events; eager timings therefore include the host's launch
overhead whenever the device waits on it. On CPU, perf_counter. Figures are medians over repeats
after warm-up.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import torch

logger = logging.getLogger("bench.kernels")

L2_FLUSH_BYTES = 256 << 20  # above any current GPU's L2 (H100 / H200: 50 MB)
RESULTS = os.path.join(os.path.dirname(__file__), "..", "results")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Cross-checks: ||got - want|| / ||want|| (Frobenius). Paths round intermediates in different
# places; a missing or misrouted expert LoRA (or a wrong key block) moves whole rows by far more.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return float(torch.linalg.vector_norm(got.double() - want) / torch.linalg.vector_norm(want))


def us(ms: float | None) -> str:
    """Milliseconds as a table cell in microseconds."""
    return "-" if ms is None else f"{ms * 1e3:.1f}"


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_device(device: torch.device, smoke: bool) -> None:
    """Exit with a message unless this run can give meaningful figures on this device."""
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device available (use --smoke --device cpu for a CPU run)")
    if not smoke and device.type != "cuda":
        sys.exit(
            f"refusing to run the full-size benchmark on {device}: GPU figures come only from a "
            "real GPU (use --smoke for a tiny CPU run)"
        )
    if smoke and device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: threads only add barrier waits on a busy machine


@dataclass(frozen=True, slots=True)
class Peaks:
    """What this device achieves in this run: the denominators of the % figures."""

    bandwidth_gbps: float  # device-to-device copy: (bytes read + bytes written) / s
    copy_bytes: int  # size of the copied buffer
    matmul_tflops: float  # dense [n, n] @ [n, n] in the bench dtype: 2 n^3 / s
    matmul_n: int
    dtype: str


class Timer:
    """Median milliseconds of a callable on one device."""

    def __init__(self, device: torch.device, repeats: int, warmup: int) -> None:
        self.device, self.repeats, self.warmup = device, repeats, warmup
        self.cuda = device.type == "cuda"
        self._flush = (
            torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device) if self.cuda else None
        )

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def ms(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.repeats):
            if self._flush is not None:
                self._flush.zero_()
                self.sync()  # idle device: launch overhead shows where the device waits on it
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1e3)
        return statistics.median(times)


def _copy_ms(timer: Timer, nbytes: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8, device=timer.device)  # [nbytes]
    dst = torch.empty_like(src)
    return timer.ms(lambda: dst.copy_(src))  # both freed on return


def measure_peaks(timer: Timer, dtype: torch.dtype, copy_bytes: int, matmul_n: int) -> Peaks:
    """Memory bandwidth from a large copy and dense matmul throughput, measured now."""
    copy_ms = _copy_ms(timer, copy_bytes)
    gen = torch.Generator(device=timer.device).manual_seed(0)
    a = torch.randn(matmul_n, matmul_n, generator=gen, device=timer.device).to(dtype)  # [n, n]
    b = torch.randn(matmul_n, matmul_n, generator=gen, device=timer.device).to(dtype)
    c = torch.empty_like(a)
    mm_ms = timer.ms(lambda: torch.mm(a, b, out=c))
    peaks = Peaks(
        bandwidth_gbps=2 * copy_bytes / (copy_ms * 1e-3) / 1e9,
        copy_bytes=copy_bytes,
        matmul_tflops=2 * matmul_n**3 / (mm_ms * 1e-3) / 1e12,
        matmul_n=matmul_n,
        dtype=str(dtype).removeprefix("torch."),
    )
    logger.info(
        "peaks: copy %.0f GB/s (%d MiB), matmul %.1f TFLOP/s (%d^3 %s)",
        peaks.bandwidth_gbps, copy_bytes >> 20, peaks.matmul_tflops, matmul_n, peaks.dtype,
    )  # fmt: skip
    return peaks


def cuda_graph(fn: Callable[[], object], device: torch.device) -> Callable[[], None] | None:
    """fn captured in a CUDA graph (its replay), or None where fn cannot be captured (a host
    sync, the reference path, or not CUDA). Replays write the same static buffers fn wrote."""
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):  # compile and autotune outside the capture
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as exc:  # capture errors surface as RuntimeError (incl. CUDA errors)
        logger.warning("CUDA graph capture failed, eager timings only: %s", exc)
        torch.cuda.synchronize(device)
        return None
    return graph.replay
