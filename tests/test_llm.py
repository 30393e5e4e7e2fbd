"""mixserve.LLM: the offline API on a tiny model with adapters."""

from __future__ import annotations

import pytest
from support.adapter_files import ATTN, MLP, BaseDims, write_adapter
from support.tiny_models import save_tiny_model, save_tiny_tokenizer, tiny_config

import mixserve
from mixserve import SamplingParams
from mixserve.adapters import MissingTensorError
from mixserve.llm import submission_order


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    model_dir = save_tiny_model(str(root / "model"), "llama", seed=5)
    save_tiny_tokenizer(model_dir)
    dims = BaseDims.of(tiny_config("llama"))
    adapters = {
        "mix": write_adapter(str(root / "mix"), dims, "mixlora", r=8, num_experts=4, seed=1),
        "dyn": write_adapter(
            str(root / "dyn"), dims, "dynmole", r=4, num_experts=3, targets=ATTN + MLP, seed=2
        ),
        "lora": write_adapter(str(root / "lora"), dims, None, r=16, seed=3),
    }
    llm = mixserve.LLM(
        model_dir, adapters=adapters, num_kv_blocks=128, block_size=8, max_num_batched_tokens=40
    )
    return llm, model_dir, adapters


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["hello there", "a b c", "mixserve serves many experts", "x"]


def test_batched_generation_equals_one_at_a_time(setup):
    llm, _, _ = setup
    adapters = ["mix", "dyn", None, "lora"]
    together = llm.generate(PROMPTS, GREEDY, adapter=adapters)
    for prompt, adapter, out in zip(PROMPTS, adapters, together, strict=True):
        alone = llm.generate(prompt, GREEDY, adapter=adapter)[0]
        assert out.token_ids == alone.token_ids
        assert out.adapter == adapter and out.prompt == prompt
        assert len(out.token_ids) == 12 and out.outputs[0].finish_reason.value == "length"
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_adapters_change_the_output(setup):
    llm, _, _ = setup
    outs = llm.generate(["hello there"] * 4, GREEDY, adapter=[None, "mix", "dyn", "lora"])
    assert len({o.token_ids for o in outs}) == 4


def test_prompt_token_ids_and_stop_tokens(setup):
    llm, _, _ = setup
    first = llm.generate(prompt_token_ids=[72, 101, 108], sampling_params=GREEDY)[0]
    stop_at = first.token_ids[3]
    params = SamplingParams(
        temperature=0, max_tokens=12, stop_token_ids=(stop_at,), ignore_eos=True
    )
    stopped = llm.generate(prompt_token_ids=[[72, 101, 108]], sampling_params=params)[0]
    cut = first.token_ids.index(stop_at) + 1
    assert stopped.token_ids == first.token_ids[:cut]
    assert stopped.outputs[0].finish_reason.value == "stop"


def test_seeded_sampling_is_reproducible_whatever_the_batch(setup):
    llm, _, _ = setup
    seeded = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, max_tokens=10, seed=1234, ignore_eos=True
    )
    alone = llm.generate("a b c", seeded, adapter="mix")[0]
    params = [SamplingParams(temperature=0.7, max_tokens=5), seeded, GREEDY]
    batched = llm.generate(["x", "a b c", "hello"], params, adapter=[None, "mix", "dyn"])[1]
    assert alone.token_ids == batched.token_ids
    other_seed = SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, max_tokens=10, seed=99, ignore_eos=True
    )
    assert llm.generate("a b c", other_seed, adapter="mix")[0].token_ids != alone.token_ids


def test_chat_uses_the_template(setup):
    llm, _, _ = setup
    out = llm.chat([{"role": "user", "content": "hi"}], GREEDY, adapter="mix")[0]
    assert llm.tokenizer.decode(out.prompt_token_ids) == "user: hi\nassistant: "


def test_bad_requests_are_refused(setup):
    llm, _, _ = setup
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        llm.generate("hi", GREEDY, adapter="nope")
    with pytest.raises(ValueError, match="exactly one"):
        llm.generate("hi", GREEDY, prompt_token_ids=[1, 2])
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate(prompt_token_ids=[[]], sampling_params=GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate("hi", SamplingParams(max_tokens=10_000))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        llm.generate(prompt_token_ids=[1, 999], sampling_params=GREEDY)
    with pytest.raises(ValueError, match="2 values for 4 prompts"):
        llm.generate(PROMPTS, GREEDY, adapter=["mix", None])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_a_bad_adapter_fails_construction_with_its_error(setup, tmp_path):
    _, model_dir, adapters = setup
    broken = write_adapter(
        str(tmp_path / "broken"), BaseDims.of(tiny_config("llama")), "mola", num_experts=2, seed=4
    )
    import os

    import torch

    weights = torch.load(os.path.join(broken, "adapter_model.bin"), weights_only=True)
    weights.pop("mola.layers.1.mlp.up_proj.experts.1.lora_B.weight")
    torch.save(weights, os.path.join(broken, "adapter_model.bin"))
    with pytest.raises(MissingTensorError, match="experts.1.lora_B"):
        mixserve.LLM(model_dir, adapters={**adapters, "broken": broken}, num_kv_blocks=8)


def test_generate_runs_its_steps_with_older_objects_frozen(setup, monkeypatch):
    import gc

    llm = setup[0]
    step = llm.engine.step
    counts = []

    def counting_step():
        counts.append(gc.get_freeze_count())
        return step()

    monkeypatch.setattr(llm.engine, "step", counting_step)
    llm.generate(PROMPTS[:2], GREEDY)
    assert counts and min(counts) > 0, "steps ran with nothing frozen"
    assert gc.get_freeze_count() == 0, "generate left objects frozen"


def test_submission_order_groups_by_first_appearance():
    adapters = ["b", None, "a", "b", None, "c", "a", "b"]
    assert submission_order(adapters) == [0, 3, 7, 1, 4, 2, 6, 5]
    assert submission_order([]) == []
    assert submission_order(["a", "a"]) == [0, 1]


def test_requests_reach_the_engine_grouped_and_come_back_in_order(setup, monkeypatch):
    llm = setup[0]
    submitted = []
    add_request = llm.engine.add_request

    def spying_add(request_id, prompt_token_ids, params, adapter):
        submitted.append(adapter)
        return add_request(request_id, prompt_token_ids, params, adapter)

    monkeypatch.setattr(llm.engine, "add_request", spying_add)
    adapters = ["mix", None, "lora", "mix", None, "dyn", "lora", "mix"]
    prompts = [f"prompt {i} " * (i + 1) for i in range(len(adapters))]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outs = llm.generate(prompts, params, adapter=adapters)
    assert submitted == ["mix", "mix", "mix", None, None, "lora", "lora", "dyn"]
    assert [o.prompt for o in outs] == prompts
    assert [o.adapter for o in outs] == adapters
    for prompt, adapter, out in zip(prompts, adapters, outs, strict=True):
        assert out.token_ids == llm.generate(prompt, params, adapter=adapter)[0].token_ids
