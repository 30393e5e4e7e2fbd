"""The authors' `mixlora` package (PyPI mixlora==0.2.3) injected into a transformers model."""

from __future__ import annotations

import mixlora
import torch


def inject_mixlora(model: torch.nn.Module, adapter_dir: str) -> torch.nn.Module:
    """Inject a MixLoRA adapter and force its dropout off (the package never calls eval() on its
    expert LoRAs, which live in a plain dict, so their dropout would stay active)."""
    config, weights = mixlora.load_adapter_weights(adapter_dir, device="cpu", dtype=torch.float32)
    mixlora.inject_adapter_in_model(model, config, weights)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for layer in model.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.dropout_.p = 0.0
    return model.eval()
