"""mixserve: serving many Mixture-of-LoRA-Experts adapters on one resident base model."""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING

from mixserve.source_tree import unshadow_pypi_kernels

unshadow_pypi_kernels()  # before anything below imports transformers

from mixserve.types import (  # noqa: E402
    CompletionOutput,
    FinishReason,
    RequestOutput,
    SamplingParams,
)

if TYPE_CHECKING:
    from mixserve.llm import LLM

try:
    __version__ = metadata.version("mixserve")
except metadata.PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["LLM", "CompletionOutput", "FinishReason", "RequestOutput", "SamplingParams"]


def __getattr__(name: str) -> object:
    # LLM pulls in torch and transformers; import it only when asked for.
    if name == "LLM":
        from mixserve.llm import LLM

        return LLM
    raise AttributeError(f"module 'mixserve' has no attribute {name!r}")
