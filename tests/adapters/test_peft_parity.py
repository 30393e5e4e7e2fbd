"""Plain LoRA: mixserve's logits equal PEFT's for adapters made and saved by PEFT itself."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from support.harness import SeqSpec, make_runner, relative_error, run_sequences
from support.tiny_models import load_reference

from mixserve.adapters import AdapterPool, PoolShape, load_adapter
from mixserve.model import load_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQS = [SeqSpec(list(range(10, 27)), "p"), SeqSpec(list(range(60, 66)), "p")]

CASES = {
    "all-targets": {"r": 8, "lora_alpha": 16, "target_modules": ALL},
    "rslora": {
        "r": 16,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "use_rslora": True,
    },
    "patterns": {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ALL,
        "rank_pattern": {"down_proj": 4, "layers.1.self_attn.q_proj": 12},
        "alpha_pattern": {"o_proj": 3},
    },
    "some-layers": {"r": 4, "lora_alpha": 8, "target_modules": ALL, "layers_to_transform": [1]},
    "regex": {"r": 8, "lora_alpha": 4, "target_modules": r".*\.(k_proj|up_proj)"},
}


def _make_peft_adapter(model_dir: str, out_dir: str, options: dict, safe: bool) -> None:
    torch.manual_seed(7)
    model = load_reference(model_dir)
    # init_lora_weights=False: random A *and* B, so the delta is not zero.
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **options))
    peft_model.save_pretrained(out_dir, safe_serialization=safe)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_matches_peft(tmp_path, tiny_model_dirs, case, family):
    model_dir = tiny_model_dirs[family]
    adapter_dir = str(tmp_path / "adapter")
    _make_peft_adapter(model_dir, adapter_dir, CASES[case], safe=case != "rslora")
    base = load_reference(model_dir)
    with torch.no_grad():
        base_logits = [base(torch.tensor([s.token_ids])).logits[0] for s in SEQS]
        peft_model = PeftModel.from_pretrained(load_reference(model_dir), adapter_dir).eval()
        want = [peft_model(torch.tensor([s.token_ids])).logits[0] for s in SEQS]

    model = load_model(model_dir)
    weights = load_adapter("p", adapter_dir, model.arch)
    pool = AdapterPool(
        model.arch,
        PoolShape.covering([weights.spec], model.arch.num_layers),
        2,
        model.dtype,
        model.device,
    )
    pool.load(1, weights)
    got = run_sequences(make_runner(model, pool), SEQS, {"p": 1}, chunk_sizes=[3, 1])
    for b, w, g in zip(base_logits, want, got, strict=True):
        assert relative_error(b, w) > 1e-3, "the adapter must change the logits"
        assert relative_error(g, w) < 1e-4
