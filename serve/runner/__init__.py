"""Model runner: KV tensors, input tensors, forward call, sampling."""

from __future__ import annotations

from mixserve.runner.model_runner import ModelRunner

__all__ = ["ModelRunner"]
