"""A tiny model and an adapter root for the live server the dashboard is checked against.

tests/api/conftest.py has a richer fixture, but conftest fixtures do not cross directories; the
dashboard needs only one routed adapter (so adapter series exist) and one plain LoRA.
"""

from __future__ import annotations

import pytest
from support.adapter_files import ATTN, MLP, BaseDims, write_adapter
from support.tiny_models import save_tiny_model, save_tiny_tokenizer, tiny_config


@pytest.fixture(scope="session")
def deploy_model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    model = save_tiny_model(str(root / "model"), "llama", seed=11)
    save_tiny_tokenizer(model)
    adapters = root / "adapters"
    dims = BaseDims.of(tiny_config("llama"))
    write_adapter(
        str(adapters / "moe"), dims, "mixlora", r=8, num_experts=4, targets=ATTN + MLP, seed=200
    )
    write_adapter(str(adapters / "lora"), dims, None, r=8, targets=("q_proj", "v_proj"), seed=201)
    return {"model": model, "adapters": str(adapters)}
