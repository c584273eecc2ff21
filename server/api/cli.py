"""`fusionserve serve | generate | convert`: the console entry point.

Kept thin: each subcommand parses its flags and calls into the module that does
the work, so the same code paths are reachable from tests without a shell.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="text to continue (or the user message with --chat)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="optional system message with --chat")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--fusion", choices=("on", "off"), default="on")
    p.add_argument(
        "--model", default=None, help="HF-layout model folder (default: the embedded SmolLM2-135M)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--quantization", default="auto", choices=("auto", "fp8", "none"))


def _pick_device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from fusionserve.models.decoder import Decoder
    from fusionserve.models.generate import GenerateOptions, generate_ids
    from fusionserve.models.registry import resolve_model
    from fusionserve.models.tokenizer import IncrementalDetokenizer, Tokenizer

    if args.max_tokens < 1:
        print("error: --max-tokens must be at least 1", file=sys.stderr)
        return 2
    model_dir = resolve_model(args.model)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = Decoder.from_pretrained(
        model_dir, device=_pick_device(args.device), dtype=dtype, quantization=args.quantization
    )
    tok = Tokenizer(model_dir)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt_ids = tok.encode(
            tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False
        )
    else:
        prompt_ids = tok.encode(args.prompt)
    opts = GenerateOptions(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        fusion=args.fusion == "on",
        stop_ids=tok.eos_token_ids,
    )
    detok = IncrementalDetokenizer(tok)
    count, t0 = 0, time.perf_counter()
    try:
        for token in generate_ids(model, prompt_ids, opts):
            count += 1
            print(detok.push(token), end="", flush=True)
    except ValueError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    print(detok.flush())
    elapsed = time.perf_counter() - t0
    print(
        f"[{count} tokens in {elapsed:.2f}s: {count / elapsed:.1f} tokens/s, "
        f"prompt {len(prompt_ids)} tokens, fusion {args.fusion}, {model.backend.name} on {model.device}]",
        file=sys.stderr,
    )
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from fusionserve.models.gguf_convert import ConversionError, convert_gguf

    try:
        out = convert_gguf(Path(args.gguf), Path(args.out_dir))
    except (ConversionError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"converted {args.gguf} → {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusionserve",
        description="OpenAI-compatible LLM inference server with fused deferred-norm kernels.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from fusionserve.server.api.serve import add_serve_args

    add_serve_args(sub.add_parser("serve", help="serve a model over the OpenAI-compatible HTTP API"))
    _add_generate_args(sub.add_parser("generate", help="generate text once, from the command line"))
    conv = sub.add_parser("convert", help="convert a llama GGUF file into an HF-layout safetensors folder")
    conv.add_argument("gguf", help="path of the .gguf file")
    conv.add_argument("out_dir", help="folder to create")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from fusionserve.server.api.serve import run_serve

        return run_serve(args)
    if args.command == "generate":
        return _run_generate(args)
    return _run_convert(args)


if __name__ == "__main__":
    sys.exit(main())
