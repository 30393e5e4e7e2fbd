"""load_adapter's stacking (loader._stack_site): one stack per role where a site's tensors fill
its [layers, experts] grid, per-tensor copies otherwise; both give what the file holds."""

from __future__ import annotations

import os

import torch
from support.bad_adapters import BIN, edit_weights, good_adapter

from mixserve.adapters import AdapterWeights, load_adapter
from mixserve.model.arch import ArchConfig


def _stacks(weights: AdapterWeights) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for proj, site in weights.sites.items():
        out[f"{proj}.lora_a"], out[f"{proj}.lora_b"] = site.lora_a, site.lora_b
        out[f"{proj}.scale"] = site.scale
    assert weights.ffn_router is not None
    out["ffn_router"] = weights.ffn_router
    return out


def _file(path: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(path, BIN), weights_only=True)


def test_each_expert_of_each_layer_lands_in_its_place(tmp_path, arch: ArchConfig):
    path = good_adapter(tmp_path, "mixlora", num_experts=3)
    file, weights = _file(path), load_adapter("a", path, arch)
    for proj in ("gate_proj", "down_proj"):
        site = weights.sites[proj]
        assert site.lora_a.shape[:2] == (arch.num_layers, 3)
        for i in range(arch.num_layers):
            for j in range(3):
                base = f"mixlora.layers.{i}.mlp.{proj}.experts.{j}"
                assert torch.equal(site.lora_a[i, j], file[f"{base}.lora_A.weight"])
                assert torch.equal(site.lora_b[i, j], file[f"{base}.lora_B.weight"])
    q = weights.sites["q_proj"]  # a plain site: one "expert"
    for i in range(arch.num_layers):
        base = f"mixlora.layers.{i}.self_attn.q_proj"
        assert torch.equal(q.lora_a[i, 0], file[f"{base}.lora_A.weight"])


def test_half_precision_files_stack_as_their_float32_values(tmp_path, arch: ArchConfig):
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


def test_saved_parameters_that_require_grad_load_as_plain_data(tmp_path, arch: ArchConfig):
    """torch's own reader (this legacy, non-zip file) rebuilds Parameters with their flag."""
    path = good_adapter(tmp_path, "mixlora")
    file = _file(path)
    params = {k: torch.nn.Parameter(v, requires_grad=True) for k, v in file.items()}
    torch.save(params, os.path.join(path, BIN), _use_new_zipfile_serialization=False)
    weights = load_adapter("a", path, arch)
    for key, value in _stacks(weights).items():
        assert not value.requires_grad, key
    base = "mixlora.layers.0.mlp.up_proj.experts.1"
    assert torch.equal(weights.sites["up_proj"].lora_a[0, 1], file[f"{base}.lora_A.weight"])


def test_a_missing_layer_stacks_zeros_there(tmp_path, arch: ArchConfig):
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
