"""Shared fixtures. Tiny models are built per test session in a temp folder; SmolLM2 is converted
once into the cache ($MIXSERVE_CACHE, default ~/.cache/mixserve) and reused."""

from __future__ import annotations

import os

# `python -m pytest` from the repository root puts the root first on sys.path, where our source
# folder kernels/ would shadow the PyPI package `kernels` that transformers imports; test helpers
# import transformers before mixserve (whose import takes the root off the path) does.
from mixserve.source_tree import unshadow_pypi_kernels  # noqa: E402

unshadow_pypi_kernels()

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

# Without a GPU, Triton kernels run in its interpreter (tests/kernels/triton). triton.jit picks
# interpreter or compiler when a function is decorated, triton.language's own helpers (tl.zeros)
# included, so the variable must be set before any test imports triton, hence here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from mixserve.model.default_model import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One saved tiny random model per family (fp32)."""
    from support.tiny_models import FAMILIES, save_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {f: save_tiny_model(str(root / f), f, seed=i) for i, f in enumerate(FAMILIES)}
    # A llama with q/k/v/o and MLP biases: MixLoRA weights the down bias inside each expert.
    dirs["llama-bias"] = save_tiny_model(
        str(root / "llama-bias"), "llama", seed=7, attention_bias=True, mlp_bias=True
    )
    return dirs


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs: dict[str, str]) -> str:
    return tiny_model_dirs["llama"]
