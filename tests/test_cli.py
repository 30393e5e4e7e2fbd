"""`mixserve generate` and `mixserve convert` on a tiny model."""

from __future__ import annotations

import json

import pytest
from support.adapter_files import BaseDims, write_adapter
from support.tiny_models import save_tiny_model, save_tiny_tokenizer, tiny_config

from mixserve.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = save_tiny_model(str(root / "model"), "qwen2", seed=2)
    save_tiny_tokenizer(model_dir)
    adapter = write_adapter(
        str(root / "mola"), BaseDims.of(tiny_config("qwen2")), "mola", num_experts=4, seed=9
    )
    return model_dir, adapter


def test_generate_prints_base_and_each_adapter(folders, capsys):
    model_dir, adapter = folders
    args = [
        "generate",
        "--model",
        model_dir,
        "--adapter",
        f"m={adapter}",
        "--prompt",
        "hi",
        "--prompt",
        "a b",
        "--max-tokens",
        "6",
        "--json",
    ]
    assert main(args) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prompt"], r["adapter"]) for r in records] == [
        ("hi", None),
        ("hi", "m"),
        ("a b", None),
        ("a b", "m"),
    ]
    assert all(len(r["token_ids"]) <= 6 for r in records)
    assert records[0]["token_ids"] != records[1]["token_ids"]


def test_generate_text_output_and_raw_prompt(folders, capsys):
    model_dir, adapter = folders
    assert (
        main(
            [
                "generate",
                "--model",
                model_dir,
                "--adapter",
                f"m={adapter}",
                "--prompt",
                "hi",
                "--max-tokens",
                "3",
                "--raw",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "### prompt: hi" in out and "--- base model ---" in out and "--- m ---" in out


def test_errors_are_reported_not_raised(folders, tmp_path, capsys):
    model_dir, _ = folders
    assert (
        main(["generate", "--model", model_dir, "--adapter", f"x={tmp_path}", "--prompt", "hi"])
        == 2
    )
    assert "adapter 'x'" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "hi"]) == 2
    with pytest.raises(SystemExit):
        main(["generate", "--adapter", "no-equals-sign", "--prompt", "hi"])


def test_convert_writes_a_loadable_folder(smollm2_dir, capsys):
    assert main(["convert"]) == 0
    assert capsys.readouterr().out.strip() == smollm2_dir
