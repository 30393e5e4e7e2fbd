"""load_adapter: folder -> validated AdapterWeights, or a typed AdapterError; no shared state.

Validation happens entirely before anything is handed to the pool, so a bad adapter can never
disturb adapters already loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable

import torch

from mixserve.adapters.config_parser import parse_adapter_config
from mixserve.adapters.errors import (
    AdapterShapeError,
    AdapterValueError,
    BaseModelMismatchError,
    MissingTensorError,
    UnexpectedTensorError,
    UnsupportedAdapterError,
)
from mixserve.adapters.files import AdapterFiles, find_adapter_files, read_config, read_weights
from mixserve.adapters.layout import (
    ExpectedTensor,
    expected_tensors,
    peft_prefix,
    rename_legacy,
    targets_from_keys,
)
from mixserve.adapters.spec import AdapterFamily, AdapterSpec, SiteKind
from mixserve.adapters.weights import FFN_ROUTER, AdapterWeights, SiteWeights, site_tensor_name
from mixserve.model.arch import ArchConfig

logger = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


# Given each stacked tensor's name and shape, float32 tensors of those shapes (any values) for
# the loader to fill: where the stacks are made (the load worker makes them in its exchange file).
NewTensors = Callable[[dict[str, tuple[int, ...]]], dict[str, torch.Tensor]]


def new_host_tensors(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape) for name, shape in shapes.items()}


def load_adapter(
    name: str, adapter_dir: str, arch: ArchConfig, new_tensors: NewTensors = new_host_tensors
) -> AdapterWeights:
    files = find_adapter_files(name, adapter_dir)
    spec = parse_adapter_config(name, files.config_path, read_config(name, files.config_path))
    weights = read_weights(name, files.weights_path)
    if spec.legacy_names:
        weights = rename_legacy(weights)
    return assemble_adapter(spec, weights, arch, files, new_tensors)


def _reject_unsupported(spec: AdapterSpec, weights: dict[str, torch.Tensor], file: str) -> None:
    magnitude = next((k for k in weights if "lora_magnitude_vector" in k), None)
    if magnitude is not None:
        raise UnsupportedAdapterError(
            spec.name,
            "PEFT DoRA (trained magnitude vectors) is not served",
            file=file,
            key=magnitude,
        )
    bias = next((k for k in weights if k.endswith(("lora_A.bias", "lora_B.bias"))), None)
    if bias is not None:
        raise UnsupportedAdapterError(spec.name, "LoRA biases are not served", file=file, key=bias)
    if spec.dora_without_magnitude:
        logger.warning(
            "adapter '%s': use_dora without saved magnitudes reloads as plain LoRA "
            "(as MoE-PEFT does)",
            spec.name,
        )


def _check_layer_count(
    spec: AdapterSpec, weights: dict[str, torch.Tensor], arch: ArchConfig, file: str
) -> None:
    indices = {int(m.group(1)) for k in weights if (m := _LAYER_INDEX.search(k))}
    if spec.layers is not None:
        beyond = [i for i in spec.layers if i >= arch.num_layers]
        if beyond:
            raise BaseModelMismatchError(
                spec.name,
                f"layers_to_transform names layer {beyond[0]}, the base model has "
                f"{arch.num_layers} layers",
                file=file,
            )
        return
    if indices and max(indices) + 1 != arch.num_layers:
        raise BaseModelMismatchError(
            spec.name,
            f"adapter has {max(indices) + 1} layers, the base model has {arch.num_layers}",
            file=file,
        )


def _check_tensor(spec: AdapterSpec, e: ExpectedTensor, tensor: torch.Tensor, file: str) -> None:
    if not tensor.dtype.is_floating_point:
        raise AdapterValueError(
            spec.name, f"dtype {tensor.dtype} is not a float dtype", file=file, key=e.key
        )
    shape = tuple(tensor.shape)
    if shape != e.shape:
        if len(shape) != 2:
            raise AdapterShapeError(
                spec.name, f"shape {shape}, expected {e.shape}", file=file, key=e.key
            )
        # Report the first differing dimension: the adapter's own settings (rank, experts) or a
        # base-model size (hidden, intermediate, heads), which means another base model.
        for got, want, what in zip(shape, e.shape, e.dim_names, strict=True):
            if got == want:
                continue
            problem = f"shape {shape}, expected {e.shape}: {what} {got} != {want}"
            if what in ("rank", "num_experts"):
                raise AdapterShapeError(
                    spec.name, problem + " (from adapter_config.json)", file=file, key=e.key
                )
            raise BaseModelMismatchError(
                spec.name, problem + " of the base model", file=file, key=e.key
            )


def _check_finite(
    spec: AdapterSpec,
    expected: dict[str, ExpectedTensor],
    weights: dict[str, torch.Tensor],
    stacked: list[torch.Tensor],
    file: str,
) -> None:
    """Every expected tensor is finite. The fast path sums each of the few stacked tensors,
    which hold every expected one: a NaN or Inf anywhere makes its sum non-finite, with no
    temporary as large as the tensor (an isfinite call per file tensor cost ~15% of a
    1000-tensor load). Only a non-finite sum (a real NaN/Inf, or finite values so huge that
    they overflow) scans the file's tensors, which names the key or finds nothing wrong."""
    if all(bool(torch.isfinite(t.sum())) for t in stacked):
        return
    for key in expected:
        if not bool(torch.isfinite(weights[key]).all()):
            raise AdapterValueError(spec.name, "holds NaN or Inf values", file=file, key=key)


def _stacked(
    out: torch.Tensor,
    entries: list[ExpectedTensor],
    weights: dict[str, torch.Tensor],
    rank_dim: int,
) -> None:
    """Fills out [L, E, ...]: each entry's tensor at [layer, expert], in its first rows along
    rank_dim (a lower rank than the site's largest is zero-padded, as are missing places).
    Where the entries are the full grid at the trailing shape (no rank pattern, no layer gaps),
    one stack into out instead of zeroing it and a slice copy per tensor: a MoE-PEFT MixLoRA
    file has ~1000 tensors, and zeroing its 28 MB first cost a pass."""
    num_layers, num_experts = out.shape[:2]
    trailing = out.shape[2:]
    by_place = {(e.layer, e.expert): e.key for e in entries}
    if len(by_place) == len(entries) == num_layers * num_experts:
        values = [weights[by_place[(i, j)]] for i in range(num_layers) for j in range(num_experts)]
        if all(v.shape == trailing for v in values):
            flat = out.view(num_layers * num_experts, *trailing)
            if all(v.dtype == out.dtype for v in values):
                torch.stack(values, out=flat)
            else:  # a half-precision file: the stack's one temporary is at its own size
                flat.copy_(torch.stack(values))
            return
    out.zero_()
    for e in entries:
        value = weights[e.key]
        out[e.layer, e.expert].narrow(rank_dim, 0, value.shape[rank_dim]).copy_(value)


def _stacked_shapes(spec: AdapterSpec, arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """Each stacked tensor's shape, by its AdapterWeights.named_tensors name."""
    num_layers = arch.num_layers
    shapes: dict[str, tuple[int, ...]] = {}
    for proj in spec.target_modules:
        num_experts = spec.site_experts(proj)
        rank = spec.max_rank(proj, num_layers)
        in_features, out_features = arch.projection_shape(proj)
        shapes[site_tensor_name(proj, "lora_a")] = (num_layers, num_experts, rank, in_features)
        shapes[site_tensor_name(proj, "lora_b")] = (num_layers, num_experts, out_features, rank)
        shapes[site_tensor_name(proj, "scale")] = (num_layers, num_experts)
        if spec.site_kind(proj) is SiteKind.ROUTED:
            shapes[site_tensor_name(proj, "router")] = (num_layers, num_experts, in_features)
    if spec.family is AdapterFamily.MIXLORA:
        shapes[FFN_ROUTER] = (num_layers, spec.num_experts, arch.hidden_size)
    return shapes


def _stack_site(
    spec: AdapterSpec,
    proj: str,
    arch: ArchConfig,
    entries: list[ExpectedTensor],
    weights: dict[str, torch.Tensor],
    out: dict[str, torch.Tensor],
) -> SiteWeights:
    """The site's tensors (entries: every expected tensor of proj) stacked per layer and expert
    into out's tensors of the site, zero-padded to the site's largest rank."""
    num_layers = arch.num_layers
    lora_a, lora_b = out[site_tensor_name(proj, "lora_a")], out[site_tensor_name(proj, "lora_b")]
    scale = out[site_tensor_name(proj, "scale")]
    router = out.get(site_tensor_name(proj, "router"))
    by_role: dict[str, list[ExpectedTensor]] = {"A": [], "B": [], "router": []}
    for e in entries:
        by_role[e.role].append(e)
    layer_scales = [spec.settings_for(proj, i).scale for i in range(num_layers)]
    # Built as a list: a tensor item assignment per expert cost ~1.5 ms of a 1000-tensor load.
    scale_rows = [[0.0] * scale.shape[1] for _ in range(num_layers)]
    for e in by_role["A"]:
        scale_rows[e.layer][e.expert] = layer_scales[e.layer]
    scale.copy_(torch.tensor(scale_rows, dtype=torch.float32).view(scale.shape))
    _stacked(lora_a, by_role["A"], weights, 0)
    _stacked(lora_b, by_role["B"], weights, 1)
    if router is not None:
        router.zero_()
        for e in by_role["router"]:
            router[e.layer] = weights[e.key]
    return SiteWeights(
        kind=spec.site_kind(proj), lora_a=lora_a, lora_b=lora_b, scale=scale, router=router
    )


def assemble_adapter(
    spec: AdapterSpec,
    weights: dict[str, torch.Tensor],
    arch: ArchConfig,
    files: AdapterFiles,
    new_tensors: NewTensors = new_host_tensors,
) -> AdapterWeights:
    """Check every tensor the spec implies against the base model, then stack per site into
    tensors new_tensors makes."""
    file = files.weights_path
    _reject_unsupported(spec, weights, file)
    prefix = spec.key_prefix or peft_prefix(spec, weights, file)
    if spec.targets_from_keys:
        spec = dataclasses.replace(spec, target_modules=targets_from_keys(weights, prefix))
    _check_layer_count(spec, weights, arch, file)
    expected: dict[str, ExpectedTensor] = {}
    for e in expected_tensors(spec, arch, prefix):
        if e.key not in weights:
            raise MissingTensorError(
                spec.name, "missing (adapter_config.json implies it)", file=file, key=e.key
            )
        expected[e.key] = e
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise UnexpectedTensorError(
            spec.name,
            f"not explained by adapter_config.json ({len(unexpected)} such tensors)",
            file=file,
            key=unexpected[0],
        )
    for e in expected.values():
        _check_tensor(spec, e, weights[e.key], file)
    by_projection: dict[str | None, list[ExpectedTensor]] = {}
    for e in expected.values():
        by_projection.setdefault(e.projection, []).append(e)
    out = new_tensors(_stacked_shapes(spec, arch))
    sites = {
        proj: _stack_site(spec, proj, arch, by_projection.get(proj, []), weights, out)
        for proj in spec.target_modules
    }
    ffn_router = out.get(FFN_ROUTER)
    if ffn_router is not None:
        routers = [
            weights[f"{prefix}.layers.{i}.mlp.moe_gate.weight"] for i in range(arch.num_layers)
        ]
        ffn_router.copy_(torch.stack(routers))
    adapter = AdapterWeights(spec=spec, sites=sites, ffn_router=ffn_router, files=files)
    # The stacks hold every expected tensor: sites stack each key of their projection, and the
    # MixLoRA FFN routers (projection None) are stacked above; anything else is checked alone.
    # (The scales come from the config, finite by its parsing.)
    loose = [
        e.key for e in expected.values() if e.projection is not None and e.projection not in sites
    ]
    stacked = adapter.tensors() + [weights[key] for key in loose]
    _check_finite(spec, expected, weights, stacked, file)
    return adapter
