"""Load a local Hugging Face folder (config.json + safetensors) into a DecoderModel."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from safetensors import SafetensorError, safe_open

from mixserve.model.arch import ArchConfig, load_arch
from mixserve.model.decoder import DecoderModel, LayerWeights, ModelWeights
from mixserve.model.errors import ModelLoadError

logger = logging.getLogger(__name__)

_INDEX = "model.safetensors.index.json"


def _weight_files(model_dir: str) -> list[str]:
    index_path = os.path.join(model_dir, _INDEX)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(index_path, f"unreadable shard index ({exc})") from exc
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise ModelLoadError(
                index_path, "unreadable shard index ('weight_map' must map tensor names to files)"
            )
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        found_bin = [f for f in os.listdir(model_dir) if f.endswith(".bin")]
        hint = (
            f" (found {', '.join(found_bin)}: save the model with safetensors)" if found_bin else ""
        )
        raise ModelLoadError(model_dir, f"no *.safetensors weight files{hint}")
    paths = [os.path.join(model_dir, f) for f in files]
    for path in paths:
        if not os.path.isfile(path):
            raise ModelLoadError(path, "listed in the shard index but missing")
    return paths


class _TensorSource:
    """Name -> tensor across shards, with errors that name the file and key."""

    def __init__(self, paths: list[str], stack: ExitStack) -> None:
        self.file_of: dict[str, str] = {}
        self.handles = {}
        for path in paths:
            try:
                handle = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
            except (SafetensorError, OSError) as exc:
                raise ModelLoadError(
                    path, f"corrupt or truncated safetensors file ({exc})"
                ) from exc
            self.handles[path] = handle
            for name in handle.keys():
                self.file_of[name] = path
        self.used: set[str] = set()

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        path = self.file_of.get(name)
        if path is None:
            raise ModelLoadError(
                os.path.dirname(next(iter(self.handles))), f"missing tensor '{name}'"
            )
        try:
            tensor = self.handles[path].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelLoadError(path, f"tensor '{name}' unreadable ({exc})") from exc
        if tuple(tensor.shape) != shape:
            raise ModelLoadError(
                path, f"tensor '{name}' has shape {tuple(tensor.shape)}, expected {shape}"
            )
        if not tensor.dtype.is_floating_point:
            raise ModelLoadError(
                path, f"tensor '{name}' has dtype {tensor.dtype}, expected a float"
            )
        self.used.add(name)
        return tensor.to(device=device, dtype=dtype)


@contextmanager
def _open_sources(model_dir: str) -> Iterator[_TensorSource]:
    with ExitStack() as stack:
        yield _TensorSource(_weight_files(model_dir), stack)


def _layer(
    src: _TensorSource, arch: ArchConfig, i: int, dtype: torch.dtype, device: torch.device
) -> LayerWeights:
    hidden, inter, head_dim = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv = arch.q_size, arch.kv_size
    p = f"model.layers.{i}."

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return src.get(p + name, shape, dtype, device)

    def bias(name: str, size: int, present: bool) -> torch.Tensor | None:
        return get(name, (size,)) if present else None

    qkv_weight = torch.cat(
        [
            get("self_attn.q_proj.weight", (q, hidden)),
            get("self_attn.k_proj.weight", (kv, hidden)),
            get("self_attn.v_proj.weight", (kv, hidden)),
        ]
    )
    qkv_bias = None
    if arch.qkv_bias:
        qkv_bias = torch.cat(
            [
                get("self_attn.q_proj.bias", (q,)),
                get("self_attn.k_proj.bias", (kv,)),
                get("self_attn.v_proj.bias", (kv,)),
            ]
        )
    gate_up_bias = None
    if arch.mlp_bias:
        gate_up_bias = torch.cat(
            [get("mlp.gate_proj.bias", (inter,)), get("mlp.up_proj.bias", (inter,))]
        )
    return LayerWeights(
        input_norm=get("input_layernorm.weight", (hidden,)),
        post_attention_norm=get("post_attention_layernorm.weight", (hidden,)),
        qkv_weight=qkv_weight,
        qkv_bias=qkv_bias,
        o_weight=get("self_attn.o_proj.weight", (hidden, q)),
        o_bias=bias("self_attn.o_proj.bias", hidden, arch.o_bias),
        q_norm=get("self_attn.q_norm.weight", (head_dim,)) if arch.qk_norm else None,
        k_norm=get("self_attn.k_norm.weight", (head_dim,)) if arch.qk_norm else None,
        gate_up_weight=torch.cat(
            [
                get("mlp.gate_proj.weight", (inter, hidden)),
                get("mlp.up_proj.weight", (inter, hidden)),
            ]
        ),
        gate_up_bias=gate_up_bias,
        down_weight=get("mlp.down_proj.weight", (hidden, inter)),
        down_bias=bias("mlp.down_proj.bias", hidden, arch.mlp_bias),
    )


def load_model(
    model_dir: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> DecoderModel:
    """Load a llama/mistral/qwen2/qwen3 folder; every tensor checked by name and shape."""
    if not os.path.isdir(model_dir):
        raise ModelLoadError(model_dir, "not a directory")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ModelLoadError(
            model_dir, f"dtype {dtype} is not supported (float32, bfloat16, float16)"
        )
    arch = load_arch(model_dir)
    device = torch.device(device)
    with _open_sources(model_dir) as src:
        embed = src.get(
            "model.embed_tokens.weight", (arch.vocab_size, arch.hidden_size), dtype, device
        )
        layers = tuple(_layer(src, arch, i, dtype, device) for i in range(arch.num_layers))
        final_norm = src.get("model.norm.weight", (arch.hidden_size,), dtype, device)
        if arch.tie_word_embeddings:
            # transformers ties the head to the embedding whatever a stored lm_head holds.
            src.used.add("lm_head.weight")
            lm_head = embed
        else:
            lm_head = src.get("lm_head.weight", (arch.vocab_size, arch.hidden_size), dtype, device)
        unused = sorted(set(src.file_of) - src.used)
        if unused:
            logger.warning(
                "%s: ignoring %d unexpected tensors (first: %s)", model_dir, len(unused), unused[0]
            )
    weights = ModelWeights(
        embed_tokens=embed, layers=layers, final_norm=final_norm, lm_head=lm_head
    )
    return DecoderModel(arch, weights)
