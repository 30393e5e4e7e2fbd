"""A tiny model with a tokenizer and adapters in an adapter root, shared by the API tests."""

from __future__ import annotations

import pytest
from support.adapter_files import ATTN, MLP, BaseDims, write_adapter
from support.tiny_models import save_tiny_model, save_tiny_tokenizer, tiny_config

KINDS = [
    ("mixlora", 8, 4, ATTN + MLP),
    ("dynmole", 8, 3, MLP),
    (None, 8, 1, ("q_proj", "v_proj")),
    ("loramoe", 4, 3, ("o_proj",) + MLP),
    ("mixlora-dynamic", 8, 4, MLP),
]


@pytest.fixture(scope="session")
def api_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    model = save_tiny_model(str(root / "model"), "llama", seed=11)
    save_tiny_tokenizer(model)
    adapters = root / "adapters"
    dims = BaseDims.of(tiny_config("llama"))
    for i in range(10):
        strategy, r, experts, targets = KINDS[i % len(KINDS)]
        write_adapter(
            str(adapters / f"ad{i}"),
            dims,
            strategy,
            r=r,
            num_experts=experts,
            targets=targets,
            seed=200 + i,
        )
    outside = root / "outside"
    write_adapter(str(outside / "secret"), dims, None, r=4, targets=("q_proj",), seed=1)
    return {"model": model, "adapters": str(adapters), "outside": str(outside), "root": root}
