"""Base model math (llama, mistral, qwen2, qwen3), weight loading and the forward context."""

from __future__ import annotations

from mixserve.model.arch import ArchConfig, load_arch
from mixserve.model.context import ForwardContext
from mixserve.model.decoder import DecoderModel
from mixserve.model.errors import ModelLoadError, UnsupportedModelError
from mixserve.model.loader import load_model

__all__ = [
    "ArchConfig",
    "DecoderModel",
    "ForwardContext",
    "ModelLoadError",
    "UnsupportedModelError",
    "load_arch",
    "load_model",
]
