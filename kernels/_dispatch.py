"""Which implementation an op runs: Triton for CUDA tensors; on CPU a compiled kernel where the
op has one that this machine builds and that takes the call (kernels/_cpu_build.py), else the
torch reference.

`MIXSERVE_KERNELS` forces a choice: `reference`, `triton` (also on CPU tensors, under
`TRITON_INTERPRET=1`: how CI tests the kernels), `cpu` (the compiled CPU kernels, an error where
one cannot run a call), or `auto` (default).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

ENV = "MIXSERVE_KERNELS"
_MODES = ("auto", "reference", "triton", "cpu")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def mode() -> str:
    # Read at every call (tests and embedding processes change it at run time); parsed once per
    # distinct value, since every op of every layer asks.
    return _parse_mode(os.environ.get(ENV, "auto"))


@functools.cache
def _parse_mode(raw: str) -> str:
    value = raw.strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(_MODES)}")
    return value


def use_triton(tensor: torch.Tensor) -> bool:
    """True when the op should run its Triton implementation for tensors on this device."""
    choice = mode()
    if choice == "reference":
        return False
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV}=triton but triton is not installed")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"{ENV}=triton on {tensor.device} tensors needs TRITON_INTERPRET=1")
        return True
    return tensor.is_cuda and triton_available()


def use_compiled_cpu(tensor: torch.Tensor) -> bool:
    """True when the op should try its compiled CPU kernel for tensors on this device (the op
    still checks that the kernel exists and takes the call; under `cpu` it must)."""
    return mode() in ("auto", "cpu") and tensor.device.type == "cpu"


def take_compiled_cpu(built: bool, reason: str | None) -> bool:
    """Whether an op runs its compiled CPU kernel: it is built here (`built`) and takes the call
    (`reason` None). Under `cpu` a call it cannot run is an error that says why."""
    if built and reason is None:
        return True
    if mode() == "cpu":
        raise RuntimeError(f"{ENV}=cpu: {reason or 'no compiled CPU kernel on this machine'}")
    return False
