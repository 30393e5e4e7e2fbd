"""load_adapter's stacking (loader._stack_site): one stack per role where a site's tensors fill
its [layers, experts] grid, per-tensor copies otherwise; both give what the file holds."""

from __future__ import annotations

import torch
from support.bad_adapters import edit_weights, good_adapter

from mixserve.adapters import load_adapter


def _stacks(weights) -> dict[str, torch.Tensor]:
    out = {}
    for proj, site in weights.sites.items():
        out[f"{proj}.lora_a"], out[f"{proj}.lora_b"] = site.lora_a, site.lora_b
        out[f"{proj}.scale"] = site.scale
    out["ffn_router"] = weights.ffn_router
    return out


def test_half_precision_files_stack_as_their_float32_values(tmp_path, arch):
    path = good_adapter(tmp_path, "mixlora")
    full = _stacks(load_adapter("a", path, arch))

    def to_bf16(tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            tensors[key] = value.bfloat16()

    edit_weights(path, to_bf16)
    half = _stacks(load_adapter("a", path, arch))
    assert half.keys() == full.keys()
    for key, value in full.items():
        assert half[key].dtype == torch.float32, key
        want = value if key.endswith(".scale") else value.bfloat16().float()
        assert torch.equal(half[key], want), key


def test_a_missing_layer_stacks_zeros_there(tmp_path, arch):
    """layers_to_transform leaves gaps in the grid: the per-tensor path fills the rest."""
    path = good_adapter(tmp_path, None, layers_to_transform=[1])

    def drop_layer_0(tensors: dict[str, torch.Tensor]) -> None:
        for key in [k for k in tensors if ".layers.0." in k]:
            del tensors[key]

    edit_weights(path, drop_layer_0)
    site = load_adapter("a", path, arch).sites["q_proj"]
    assert not site.lora_a[0].any() and not site.lora_b[0].any()
    assert site.lora_a[1].any() and site.lora_b[1].any()
    assert site.scale[0].eq(0).all() and site.scale[1].gt(0).all()
