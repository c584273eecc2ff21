"""Structured output's cost: N concurrent JSON-schema streams against the same load unconstrained,
and the time to first token with a cold and a cached grammar.

    python bench/structured.py --shape 8b --tokenizer DIR --device cuda    # the device (random 8B weights)
    python bench/structured.py --shape default --device cpu --streams 16 --max-tokens 32

The engine runs in this process (no HTTP): both loads are N requests with the same prompts, seeds
and length (`max_tokens` tokens each: unconstrained rows ignore EOS, the schema cannot complete
sooner), run in alternating rounds; the report gives each load's output tokens/s (median), their
ratio, the host time the masks took per constrained step, and TTFT (add → first token, engine
otherwise idle) for a grammar never seen (the engine compiles it while the request waits) and for
a cached one, plus the HTTP side's validation of a cold and a cached grammar. Every constrained
output is checked against its grammar (a fresh matcher must accept all its tokens).

`--shape 8b`: Llama-3.1-8B's shapes with random bf16 weights and vocabulary 128,256, read through
the default model's byte-level tokenizer (49,152 ids; the 79,104 padded ids are always masked in
constrained rows, as for a model whose embedding is padded). `--shape default`: the default model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, markdown_table, write_results  # noqa: E402
from fusionserve.models.tokenizer import Tokenizer  # noqa: E402
from fusionserve.server.api.structured_output import JSON_LAYOUT, Constraint, GrammarValidator  # noqa: E402
from fusionserve.server.contract import EngineConfig, SamplingParams  # noqa: E402
from fusionserve.server.engine.llm_engine import LLMEngine  # noqa: E402

#: Records of a few typed fields, at least 1000 of them: the grammar cannot complete within the run.
RECORDS = {
    "type": "array",
    "minItems": 1000,
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "name": {"type": "string", "maxLength": 12},
            "score": {"type": "number"},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        },
        "required": ["id", "name", "score", "tags"],
        "additionalProperties": False,
    },
}


def grammar_of(schema: dict) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)


def build_engine(args: argparse.Namespace) -> LLMEngine:
    cfg = dict(max_num_seqs=args.streams, max_model_len=2048, layer_timing_every=0, device=args.device)
    if args.shape == "default":
        from fusionserve.models.registry import default_model_dir

        return LLMEngine(EngineConfig(model_dir=str(default_model_dir()), **cfg))
    from bench.decode import config_of, random_weights
    from fusionserve.kernels.backend import select_backend
    from fusionserve.models.decoder import Decoder, geometry

    mc = config_of("8b")
    dec = Decoder(mc, random_weights(mc), select_backend(args.device, geometry(mc)), max_model_len=4096)
    return LLMEngine(
        EngineConfig(served_model_name="llama-8b-shape", **cfg),
        decoder=dec,
        tokenizer=Tokenizer(args.tokenizer),
    )


def run_load(eng: LLMEngine, prompts: list[list[int]], max_tokens: int, grammar: str | None) -> dict:
    """All requests at once, stepped to completion: output tokens/s and the masks' host time."""
    matchers = eng._grammars
    mask_s = [0.0, 0]
    if matchers is not None:  # time the host side of every masked step
        apply = type(matchers).apply

        def timed(self, *a, **kw):
            t = time.perf_counter()
            apply(self, *a, **kw)
            mask_s[0] += time.perf_counter() - t
            mask_s[1] += 1

        matchers.apply = timed.__get__(matchers)
    tokens: dict[str, list[int]] = {}
    run_load.last_tokens = tokens
    for i, p in enumerate(prompts):
        sp = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i, ignore_eos=True, grammar=grammar)
        eng.add_request(f"r{i}", p, sp)
        tokens[f"r{i}"] = []
    t0 = time.perf_counter()
    while eng.has_unfinished():
        for out in eng.step():
            tokens[out.request_id] += out.token_ids
    seconds = time.perf_counter() - t0
    if matchers is not None:
        del matchers.apply
    n = sum(len(t) for t in tokens.values())
    assert n == len(prompts) * max_tokens, (n, len(prompts), max_tokens)
    if grammar is not None:
        check = eng.grammars
        for ids in tokens.values():
            m = check.matcher(grammar)
            assert m.consume_tokens(ids), m.get_error()
    return dict(tok_s=n / seconds, seconds=seconds, mask_ms_per_step=1e3 * mask_s[0] / max(mask_s[1], 1))


def mask_fill_ms(eng: LLMEngine, grammar: str, outputs: list[list[int]]) -> float:
    """llguidance alone: one batch of masks for matchers midway through the recorded outputs."""
    g = eng.grammars
    matchers = []
    for ids in outputs:
        m = g.matcher(grammar)
        m.consume_tokens(ids[: len(ids) // 2])
        matchers.append(m)
    buf = torch.empty((len(matchers), g.words), dtype=torch.int32)
    times = []
    for _ in range(20):
        t = time.perf_counter()
        g.executor.unsafe_compute_mask_ptr(
            list(zip(matchers, range(len(matchers)))), buf.data_ptr(), g.words * 4, len(matchers)
        )
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def ttft(eng: LLMEngine, prompt: list[int], grammar: str) -> float:
    t0 = time.perf_counter()
    eng.add_request("ttft", prompt, SamplingParams(max_tokens=1, grammar=grammar))
    while eng.has_unfinished():
        for out in eng.step():
            if out.token_ids:
                first = time.perf_counter() - t0
    return first


def unique_schema(k: int) -> dict:
    return {
        **RECORDS,
        "items": {
            **RECORDS["items"],
            "properties": {**RECORDS["items"]["properties"], f"f{k}": {"type": "integer"}},
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=("8b", "default"), default="default")
    ap.add_argument(
        "--tokenizer", default=None, help="a folder with the default model's tokenizer files (8b)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    eng = build_engine(args)
    tok = eng.tokenizer
    words = "please write the records of the sensor log as json with ids names scores and tags".split()
    text = " ".join(words[i % len(words)] for i in range(args.prompt_len))
    prompts = [tok.encode(text)[: args.prompt_len - 1] + [(7 * i) % 1000 + 100] for i in range(args.streams)]
    grammar = grammar_of(RECORDS)
    eng.grammars.compile_async(grammar).result()  # the load measures steps, not the first compile
    run_load(eng, prompts[:2], 8, None)  # warm both paths
    run_load(eng, prompts[:2], 8, grammar)
    plain, constrained = [], []
    for _ in range(args.rounds):
        plain.append(run_load(eng, prompts, args.max_tokens, None))
        constrained.append(run_load(eng, prompts, args.max_tokens, grammar))
    fill_ms = mask_fill_ms(eng, grammar, list(run_load.last_tokens.values()))
    cold = [ttft(eng, prompts[0], grammar_of(unique_schema(k))) for k in range(5)]
    warm = [ttft(eng, prompts[0], grammar) for _ in range(5)]
    validator = GrammarValidator(Path(tok.model_dir) / "tokenizer.json", eng.decoder.config.vocab_size)

    async def validate(g: str) -> float:
        t = time.perf_counter()
        await validator.check(Constraint(g, "response_format", "json"))
        return time.perf_counter() - t

    http_cold = [asyncio.run(validate(grammar_of(unique_schema(100 + k)))) for k in range(5)]
    http_warm = [asyncio.run(validate(grammar)) for _ in range(5)]
    med = statistics.median
    p_tok, c_tok = med(r["tok_s"] for r in plain), med(r["tok_s"] for r in constrained)
    summary = dict(
        shape=args.shape, device=args.device, streams=args.streams, max_tokens=args.max_tokens,
        prompt_len=args.prompt_len, rounds=args.rounds,
        unconstrained_tok_s=p_tok, constrained_tok_s=c_tok, ratio=c_tok / p_tok,
        mask_ms_per_step=med(r["mask_ms_per_step"] for r in constrained),
        llguidance_fill_ms=fill_ms,
        ttft_cold_ms=1e3 * med(cold), ttft_cached_ms=1e3 * med(warm),
        validate_cold_ms=1e3 * med(http_cold), validate_cached_ms=1e3 * med(http_warm),
    )  # fmt: skip
    env = environment()
    title = (
        f"Structured output, {args.shape} shape on {env.get('gpu') or 'CPU'} ({args.device}); {args.streams} "
        f"concurrent streams x {args.max_tokens} tokens, prompts of {args.prompt_len}; medians of "
        f"{args.rounds} alternating rounds; bench/structured.py\n\n"
    )
    table = title + markdown_table(
        ["unconstrained tok/s", "JSON-schema tok/s", "ratio", "mask host ms/step", "of it llguidance", "TTFT cold grammar ms",
         "TTFT cached ms", "HTTP validate cold ms", "cached ms"],
        [[f"{p_tok:.0f}", f"{c_tok:.0f}", f"{c_tok / p_tok:.3f}", f"{summary['mask_ms_per_step']:.2f}", f"{fill_ms:.2f}",
          f"{summary['ttft_cold_ms']:.1f}", f"{summary['ttft_cached_ms']:.1f}",
          f"{summary['validate_cold_ms']:.1f}", f"{summary['validate_cached_ms']:.2f}"]],
    )  # fmt: skip
    payload = {"env": env, "summary": summary, "plain": plain, "constrained": constrained}
    write_results(f"structured_{args.shape}_{args.device}", payload, table, args.out)
    print(table)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
