"""Per-token decode latency on the GPU: fusionserve fused vs off vs gpt-fast vs HF transformers vs the roofline.

Random bf16 weights of the real shapes are generated on the device (no
download). Our step is the product's own CUDA-graph replay (server/engine/cuda_graphs.py)
of forward + LM head + greedy tokens, as serving runs it (fused: the LM head draws the tokens itself,
FlashSampling; off: logits, then the sampler's argmax; `--step logits` stops at the logits, as
results before FlashSampling did); gpt-fast's step ends in its argmax too. Every sequence in the batch sits at the same context
length, its KV cache filled with random values. gpt-fast's model.py (brought
with the search tool's `fetch`, never committed) runs compiled with
mode="reduce-overhead" on the same shapes; transformers runs eager with a
DynamicCache kept at the same length.

    python bench/decode.py --models 8b,135m --batches 1,8,32,64 --contexts 512,4096 \
        [--gptfast .gptfast/gptfast_model.py] [--hf] [--profile] [--pdl default,off]

`--pdl default,off` also captures and times graphs without programmatic dependent launch (extra
columns), interleaved with the product's default in the same process.

A "-fp8" shape (`--models 8b,8b-fp8`) serves the block GEMMs in FP8 (kernels/fp8.py); its gpt-fast
column is gpt-fast's int8 weight-only mode (its quantize.py, next to model.py in .gptfast/:
`mkdir .gptfast; git -C <fetched gpt-fast> show HEAD:model.py > .gptfast/gptfast_model.py;
git -C <...> show HEAD:quantize.py > .gptfast/quantize.py`, carried, never committed).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import copy_bandwidth, environment, markdown_table, write_results  # noqa: E402
from fusionserve.kernels.backend import draw_tokens, select_backend  # noqa: E402
from fusionserve.kernels.batch import Draw, PagedBatch  # noqa: E402
from fusionserve.kernels.fp8 import quantize_weight  # noqa: E402
from fusionserve.kernels.pdl import pdl_available  # noqa: E402
from fusionserve.models.config import ModelConfig  # noqa: E402
from fusionserve.models.decoder import Decoder, KVCache, geometry  # noqa: E402
from fusionserve.models.loader import LayerWeights, ModelWeights  # noqa: E402
from fusionserve.models.registry import fusionserve_home  # noqa: E402
from fusionserve.server.engine.cuda_graphs import DecodeGraphs  # noqa: E402

TILE_CACHE = (
    fusionserve_home() / "tiles"
)  # the per-GPU tiles the server reads (bench/decode_configs.py caches)

LLAMA31_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}  # fmt: skip
ARCHS = {
    "8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE,
        max_position_embeddings=131072,
    ),
    "135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    # GPT-NeoX (Pythia): LayerNorm with bias, rotary on a quarter of each head, parallel residual, GELU MLP
    "pythia-1.4b": dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_layers=24, num_heads=16,
        num_kv_heads=16, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
        layer_norm=True, rotary_dim=32, parallel_residual=True, gelu="none", dense_bias=True,
        attention_bias=True, architecture="GPTNeoXForCausalLM",
    ),
    "pythia-6.9b": dict(
        vocab_size=50432, hidden_size=4096, intermediate_size=16384, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
        layer_norm=True, rotary_dim=32, parallel_residual=True, gelu="none", dense_bias=True,
        attention_bias=True, architecture="GPTNeoXForCausalLM",
    ),
}  # fmt: skip
GPTFAST_ARGS = {
    "8b": dict(block_size=131072, n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336,
               vocab_size=128256, rope_base=500000, rope_scaling=dict(factor=8.0, low_freq_factor=1.0,
               high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "135m": dict(block_size=8192, n_layer=30, n_head=9, n_local_heads=3, dim=576, intermediate_size=1536,
                 vocab_size=49152, rope_base=100000),
}  # fmt: skip


def config_of(name: str) -> ModelConfig:
    """A shape by name; a "-fp8" suffix (e.g. 8b-fp8) serves it with FP8 block weights (kernels/fp8.py)."""
    base, fp8 = (name[:-4], "fp8") if name.endswith("-fp8") else (name, None)
    return ModelConfig(
        **{"architecture": "LlamaForCausalLM", "dtype": torch.bfloat16, **ARCHS[base], "quantization": fp8}
    )


def random_weights(
    cfg: ModelConfig, device: str = "cuda", dtype: torch.dtype = torch.bfloat16
) -> ModelWeights:
    """Weights with the real shapes and a realistic scale (so activations stay O(1))."""
    h, d, i_ = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * d

    def w(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, device=device, dtype=dtype) * k**-0.5

    if cfg.layer_norm:  # biases, and the column sums the deferred mean needs

        def b(n: int) -> torch.Tensor:
            return torch.randn(n, device=device, dtype=dtype) * 0.1

        def c(weight: torch.Tensor) -> torch.Tensor:
            return weight.float().sum(1)

        layers = []
        for _ in range(cfg.num_layers):
            w_qkv, w_up = w(qkv, h), w(i_, h)
            layers.append(LayerWeights(
                w_qkv=w_qkv, b_qkv=b(qkv), c_qkv=c(w_qkv), w_o=w(h, h), b_o=b(h),
                w_gate_up=w_up, b_up=b(i_), c_up=c(w_up), w_down=w(h, i_), b_down=b(h),
            ))  # fmt: skip
        head = w(cfg.vocab_size, h)
        return ModelWeights(w(cfg.vocab_size, h), layers, head, b_head=b(cfg.vocab_size), c_head=c(head))
    q = quantize_weight if cfg.quantization == "fp8" else (lambda t: t)
    layers = [
        LayerWeights(
            w_qkv=q(w(qkv, h)),
            b_qkv=None,
            w_o=q(w(h, cfg.num_heads * d)),
            w_gate_up=q(w(2 * i_, h)),
            w_down=q(w(h, i_)),
        )  # fmt: skip
        for _ in range(cfg.num_layers)
    ]
    return ModelWeights(embed=w(cfg.vocab_size, h), layers=layers, lm_head=w(cfg.vocab_size, h))


def weight_bytes(cfg: ModelConfig) -> int:
    h, d, i_ = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    mlp = (2 if cfg.layer_norm else 3) * i_ * h  # GPT-NeoX: up and down; Llama: gate, up and down
    per_layer = (cfg.num_heads + 2 * cfg.num_kv_heads) * d * h + h * cfg.num_heads * d + mlp
    block_bytes = 1 if cfg.quantization == "fp8" else 2  # e4m3 block weights; the LM head stays bf16
    return block_bytes * cfg.num_layers * per_layer + 2 * cfg.vocab_size * h


def kv_bytes(cfg: ModelConfig, batch: int, ctx: int) -> int:
    return 2 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * batch * ctx


def time_fn(fn, inner: int = 20, outer: int = 15) -> float:
    """Median over `outer` samples of the mean time of `inner` back-to-back calls (seconds)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(outer):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(inner):
            fn()
        e.record()
        e.synchronize()
        samples.append(s.elapsed_time(e) / 1e3 / inner)
    return statistics.median(samples)


def decode_batch(
    batch: int, ctx: int, block_size: int, device: str | torch.device = "cuda"
) -> tuple[PagedBatch, torch.Tensor, torch.Tensor]:
    """B sequences at context `ctx`, each with its own consecutive blocks, adding token number ctx."""
    per_seq = -(-(ctx + 1) // block_size)
    tables = torch.arange(batch * per_seq, dtype=torch.int32).view(batch, per_seq)
    slots = (tables[:, ctx // block_size].long() * block_size + ctx % block_size).contiguous()
    pb = PagedBatch(
        query_start=torch.arange(batch + 1, dtype=torch.int32),
        context_lens=torch.full((batch,), ctx + 1, dtype=torch.int32),
        block_tables=tables,
        slot_mapping=slots,
        max_query_len=1,
        max_context_len=ctx + 1,
        block_size=block_size,
    )
    return (
        pb.to(device),
        torch.randint(0, 1000, (batch,), device=device),
        torch.full((batch,), ctx, device=device),
    )


def filled_kv_cache(model: Decoder, batch: int, ctx: int) -> KVCache:
    """A paged cache with room for `batch` sequences at `ctx` + 1 tokens, filled with random K/V."""
    kv = model.allocate_kv_cache(batch * -(-(ctx + 1) // 16), 16)
    for t in kv.k + kv.v:
        t.normal_()
    return kv


def greedy_draw(batch: int, device: str | torch.device = "cuda") -> Draw:
    """Greedy rows (T = 0): the draw a decode step of plain greedy requests takes."""
    return Draw(
        torch.zeros(batch, device=device), torch.zeros(batch, dtype=torch.int64, device=device), False
    )


def replay_step(
    graphs: DecodeGraphs, ids, pos, pb, fused: bool, tokens: bool = True, flash: bool = True
) -> torch.Tensor:
    """One decode step as serving runs it: fused, the graph whose LM head draws the greedy tokens itself
    (FlashSampling); off (or `flash=False`), the logits graph and then the sampler's pass over them
    (server/engine/sampler.py: an argmax for greedy rows). `tokens=False`: forward + logits only."""
    if not tokens:
        return graphs.run(ids, pos, pb, fused)
    draw = greedy_draw(ids.shape[0], ids.device)
    if fused and flash:
        return graphs.run(ids, pos, pb, True, draw)
    return draw_tokens(graphs.run(ids, pos, pb, fused), draw)


def best_of_interleaved(
    model: Decoder,
    kv: KVCache,
    batch: int,
    ctx: int,
    variants: dict,
    apply,
    fused_modes=(True, False),
    rounds=2,
    tokens: bool = True,
    no_flash: frozenset = frozenset(),
) -> dict[tuple, float]:
    """Side-by-side decode-step times (ms) of graph variants: `apply(variant)` sets each up before its
    own graphs are captured; then every (variant, fused) is timed in turn, `rounds` times, best kept.
    A step ends in its greedy tokens (`replay_step`; `tokens=False`: in its logits); variants named in
    `no_flash` sample fused steps from written logits."""
    pb, ids, pos = decode_batch(batch, ctx, 16)
    graphs = {}
    for name, variant in variants.items():
        apply(variant)
        graphs[name] = DecodeGraphs(model, kv, max_batch=batch, batch_sizes=(batch,))
        graphs[name].capture()
    best: dict[tuple, float] = {}
    for _ in range(rounds):
        for name, g in graphs.items():
            for fused in fused_modes:
                flash = name not in no_flash
                t = time_fn(lambda f=fused, g=g, fl=flash: replay_step(g, ids, pos, pb, f, tokens, fl)) * 1e3
                best[(name, fused)] = min(best.get((name, fused), 1e9), t)
    return best


def bench_ours(
    name: str,
    batches: list[int],
    contexts: list[int],
    results: list[dict],
    bw: float,
    pdl_modes=(True,),
    tokens: bool = True,
    parts: tuple[str, ...] = (),
) -> Decoder:
    """Fused and off, each with every PDL mode asked for (own graphs), timed interleaved in one process.

    fused_ms / off_ms are the first PDL mode's (the product default: on where supported); the others are
    reported as fused_pdl_<mode>_ms / off_pdl_<mode>_ms. `parts` ("no-rope", "no-flash"): the fused path
    without one of this stop's fusions (RoPE + KV write in the qkv GEMM; FlashSampling), as
    fused_<part>_ms columns from the same interleaved rounds.
    """
    cfg = config_of(name)
    max_len = max(contexts) + 16
    backend = select_backend("cuda", geometry(cfg), tile_cache=TILE_CACHE)  # the server's tiles
    model = Decoder(cfg, random_weights(cfg), backend, max_model_len=max_len)
    for ctx in contexts:
        for b in batches:
            try:
                kv = filled_kv_cache(model, b, ctx)
            except torch.OutOfMemoryError:
                results.append(dict(model=name, batch=b, ctx=ctx, engine="fusionserve", note="OOM"))
                continue
            # Key suffix per PDL mode: none for the headline (first) mode.
            suffixes = {
                ("" if i == 0 else f"_pdl_{'on' if p else 'off'}"): (p, True) for i, p in enumerate(pdl_modes)
            }
            suffixes.update(
                {f"_{part.replace('-', '_')}": (pdl_modes[0], part != "no-rope") for part in parts}
            )

            def apply(variant, be=model.backend):
                be.pdl, be.rope_in_gemm = variant

            no_flash = frozenset(s for s in suffixes if s == "_no_flash")
            best = best_of_interleaved(model, kv, b, ctx, suffixes, apply, tokens=tokens, no_flash=no_flash)
            row = dict(model=name, batch=b, ctx=ctx)
            for (suffix, fused), ms in best.items():
                row[("fused" if fused else "off") + suffix + "_ms"] = ms
            model.backend.pdl, model.backend.rope_in_gemm = pdl_modes[0], True
            roof = (weight_bytes(cfg) + kv_bytes(cfg, b, ctx)) / bw
            row["roofline_ms"] = roof * 1e3
            row["pdl"] = pdl_modes[0]
            row["fused_gain_pct"] = 100 * (row["off_ms"] / row["fused_ms"] - 1)
            row["fused_pct_of_roofline"] = 100 * row["roofline_ms"] / row["fused_ms"]
            results.append(row)
            print(row, flush=True)
            kv = None
            gc.collect()
            torch.cuda.empty_cache()
    return model


def graph_kernel_events(
    graphs: DecodeGraphs, ids, pos, pb, fused: bool, replays: int = 10
) -> list[tuple[str, float]]:
    """(kernel name, µs) of every GPU kernel in `replays` warm replays of a captured decode step."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        replay_step(graphs, ids, pos, pb, fused)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            replay_step(graphs, ids, pos, pb, fused)
        torch.cuda.synchronize()
    events = sorted(
        (ev for ev in prof.events() if ev.device_type.name == "CUDA"), key=lambda e: e.time_range.start
    )
    return [
        (ev.name, ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total)
        for ev in events
    ]


def step_sequence(events: list[tuple[str, float]], replays: int) -> list[tuple[str, float]]:
    """The step's kernels in launch order, µs the median over replays (positions line up: every replay
    of one graph launches the same kernels), so fused and off can be compared kernel by kernel."""
    per = len(events) // max(1, replays)
    if per == 0 or per * replays != len(events):
        return []
    return [
        (events[i][0], statistics.median(events[r * per + i][1] for r in range(replays))) for i in range(per)
    ]


def profile_step(model: Decoder, name: str, fused: bool, batch: int = 1) -> dict:
    """A decode step (ctx 512) under the torch profiler: kernels per step, time by category, and the
    kernels in launch order (JSON only)."""
    kv = model.allocate_kv_cache(batch * -(-513 // 16), 16)
    pb, ids, pos = decode_batch(batch, 512, 16)
    graphs = DecodeGraphs(model, kv, max_batch=batch, batch_sizes=(batch,))
    graphs.capture()
    events = graph_kernel_events(graphs, ids, pos, pb, fused)
    cats = {"gemm": 0.0, "attention": 0.0, "norm": 0.0, "elementwise/other": 0.0}
    kernels: dict[str, float] = {}
    count = len(events)
    for kname, us in events:
        kernels[kname] = kernels.get(kname, 0.0) + us / 10
        low = kname.lower()
        if any(k in low for k in ("gemm", "gemv", "linear", "matmul", "sm90", "cutlass", "nvjet")):
            cat = "gemm"
        elif any(k in low for k in ("attn", "attention", "_decode_kernel", "_decode_reduce", "prefill")):
            cat = "attention"
        elif "norm" in low or "stats" in low:
            cat = "norm"
        else:
            cat = "elementwise/other"
        cats[cat] += us / 10
    top = sorted(kernels.items(), key=lambda kv_: -kv_[1])[:8]
    graphs = kv = None
    return dict(
        model=name,
        batch=batch,
        fused=fused,
        kernels_per_step=count / 10,
        category_us=cats,
        top_kernels_us=top,
        sequence_us=step_sequence(events, 10),
    )


def _gptfast_int8(model, model_py: str, gf):
    """gpt-fast's own int8 weight-only mode (its quantize.py beside model.py): every nn.Linear to int8
    per output channel, dequantized in the GEMV. Its tokenizer import is stubbed (not needed here)."""
    import types

    stub = types.ModuleType("tokenizer")
    stub.get_tokenizer = None
    sys.modules.setdefault("tokenizer", stub)
    sys.modules["model"] = gf
    spec = importlib.util.spec_from_file_location("gptfast_quantize", Path(model_py).with_name("quantize.py"))
    q = importlib.util.module_from_spec(spec)
    sys.modules["gptfast_quantize"] = q  # dynamo re-imports its WeightOnlyInt8Linear's module by name
    spec.loader.exec_module(q)
    handler = q.WeightOnlyInt8QuantHandler(model)
    state = handler.create_quantized_state_dict()
    model = handler.convert_for_runtime()
    model.load_state_dict(state, assign=True)
    return model.to("cuda")


def bench_gptfast(path: str, name: str, batches: list[int], contexts: list[int], results: list[dict]) -> None:
    """gpt-fast compiled as its generate.py does; for a "-fp8" shape, in its int8 weight-only mode."""
    spec = importlib.util.spec_from_file_location("gptfast_model", path)
    gf = importlib.util.module_from_spec(spec)
    sys.modules["gptfast_model"] = gf  # dynamo re-imports the module by name while tracing
    spec.loader.exec_module(gf)
    int8 = name.endswith("-fp8")
    import torch._inductor.config as ind

    ind.coordinate_descent_tuning = True
    ind.triton.unique_kernel_names = True
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = gf.Transformer(gf.ModelArgs(**GPTFAST_ARGS[name.removesuffix("-fp8")])).eval()
    torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        p.data.normal_(0, p.shape[-1] ** -0.5)
        if p.ndim == 1:
            p.data.fill_(1.0)
    if int8:
        model = _gptfast_int8(model, path, gf)

    def step(x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return torch.argmax(model(x, input_pos)[:, -1], dim=-1)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for ctx in contexts:
        for b in batches:
            with torch.device("cuda"):
                model.max_seq_length = -1
                model.setup_caches(max_batch_size=b, max_seq_length=ctx + 8)
            x = torch.randint(0, 1000, (b, 1), device="cuda")
            input_pos = torch.tensor([ctx], device="cuda")
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in range(3):
                    compiled(x, input_pos)
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                t = time_fn(lambda c=compiled, a=x, ip=input_pos: c(a, ip))
            row = dict(
                model=name, batch=b, ctx=ctx, engine="gpt-fast int8" if int8 else "gpt-fast",
                gptfast_ms=t * 1e3, compile_s=compile_s,
            )  # fmt: skip
            results.append(row)
            print(row, flush=True)
    model = compiled = None
    torch._dynamo.reset()


def bench_hf(name: str, cases: list[tuple[int, int]], results: list[dict]) -> None:
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    a = ARCHS[name]
    cfg = LlamaConfig(
        vocab_size=a["vocab_size"],
        hidden_size=a["hidden_size"],
        intermediate_size=a["intermediate_size"],
        num_hidden_layers=a["num_layers"],
        num_attention_heads=a["num_heads"],
        num_key_value_heads=a["num_kv_heads"],
        head_dim=a["head_dim"],
        rope_theta=a["rope_theta"],
        max_position_embeddings=a["max_position_embeddings"],
        tie_word_embeddings=a.get("tie_word_embeddings", False),
        rope_scaling=a.get("rope_scaling"),
    )
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    for b, ctx in cases:
        with torch.no_grad():
            cache = DynamicCache(config=cfg)
            model(
                torch.randint(0, 1000, (b, ctx), device="cuda"),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            x = torch.randint(0, 1000, (b, 1), device="cuda")

            def step(m=model, a=x, c=cache, n=ctx) -> None:
                m(a, past_key_values=c, use_cache=True)
                c.crop(n)

            t = time_fn(step, inner=5, outer=7)
        row = dict(model=name, batch=b, ctx=ctx, engine="hf-eager", hf_ms=t * 1e3)
        results.append(row)
        print(row, flush=True)
        cache = None
        torch.cuda.empty_cache()
    model = None
    gc.collect()
    torch.cuda.empty_cache()


def report(results: list[dict], profiles: list[dict], bw: float, out: str | None, tag: str = "") -> None:
    """Write JSON + Markdown (called after every model, so a cut-off run keeps what it measured)."""
    alt = sorted({k[: -len("_ms")] for r in results for k in r if "_pdl_" in k and k.endswith("_ms")})
    rows = []
    for r in results:
        if "fused_ms" not in r:
            continue
        peers = {
            k: v
            for x in results
            if x.get("model") == r["model"] and x.get("batch") == r["batch"] and x.get("ctx") == r["ctx"]
            for k, v in x.items()
            if k in ("gptfast_ms", "hf_ms")
        }
        gf = peers.get("gptfast_ms")
        rows.append(
            [
                r["model"],
                r["batch"],
                r["ctx"],
                r["fused_ms"],
                r["off_ms"],
                f"{r['fused_gain_pct']:+.1f}%",
                *[r.get(k + "_ms", "-") for k in alt],
                gf if gf else "-",
                f"{gf / r['fused_ms']:.2f}x" if gf else "-",
                peers.get("hf_ms", "-"),
                r["roofline_ms"],
                f"{r['fused_pct_of_roofline']:.0f}%",
            ]
        )
    env = environment()
    cached = sorted(p.name for p in TILE_CACHE.glob("*.json")) if TILE_CACHE.is_dir() else []
    env["tiles"] = "shipped" + (f" + cached {', '.join(cached)}" if cached else "")
    pdl = next((r["pdl"] for r in results if "pdl" in r), None)
    headers = ["model", "batch", "ctx", "fused", "off", "fused gain", *[k.replace("_", " ") for k in alt]]
    headers += ["gpt-fast", "vs gpt-fast", "HF eager", "roofline", "% roofline"]
    table = (
        f"Decode latency per step (ms), {env.get('gpu')}, torch {env['torch']}, triton {env.get('triton')}, "
        f"{env['date']}; copy bandwidth {bw / 1e12:.2f} TB/s; CUDA graphs; PDL {'on' if pdl else 'off'} "
        f"in fused/off; decode-GEMM tiles {env['tiles']}; medians\n\n" + markdown_table(headers, rows)
    )
    if profiles:
        prow = [
            [
                p["model"],
                p.get("batch", 1),
                "on" if p["fused"] else "off",
                p["kernels_per_step"],
                *[round(p["category_us"][c], 1) for c in ("gemm", "attention", "norm", "elementwise/other")],
            ]
            for p in profiles
        ]
        table += "\n\nDecode step profile (ctx 512, µs per step by kernel category)\n\n" + markdown_table(
            ["model", "batch", "fusion", "kernels/step", "gemm", "attention", "norm", "elementwise/other"],
            prow,
        )
    payload = {"env": env, "copy_bandwidth": bw, "results": results, "profiles": profiles}
    gpu = "_".join((env.get("gpu") or "gpu").lower().split()) + (f"_{tag}" if tag else "")
    write_results(f"decode_{gpu}", payload, table)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"decode_{gpu}.md").write_text(table + "\n")
        (Path(out) / f"decode_{gpu}.json").write_text(json.dumps(payload, indent=2, default=str))
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="135m,8b")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--gptfast", default=None, help="path of gpt-fast's model.py")
    ap.add_argument("--gptfast-batches", default="1")
    ap.add_argument(
        "--gptfast-contexts", default="512", help="each shape is a separate compile: keep it short"
    )
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-batches", default="1", help="batch sizes of the --profile steps (ctx 512)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    ap.add_argument(
        "--step",
        choices=("tokens", "logits"),
        default="tokens",
        help="what a timed step ends in (tokens: as served)",
    )
    ap.add_argument(
        "--parts",
        default="",
        help="also time the fused path without a fusion: no-rope (RoPE/KV write as its own pass), no-flash "
        "(sample from written logits), comma-separated",
    )
    ap.add_argument(
        "--pdl", default="default", help="PDL modes, the first is the headline: default | on | off | on,off"
    )
    args = ap.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    parts = tuple(p for p in args.parts.split(",") if p)
    if any(p not in ("no-rope", "no-flash") for p in parts):
        ap.error(f"--parts {args.parts}: expected no-rope and/or no-flash")
    contexts = [int(x) for x in args.contexts.split(",")]
    for name in args.models.split(","):
        limit = config_of(name).max_position_embeddings
        if max(contexts) >= limit:  # the timed step adds token number ctx + 1
            ap.error(
                f"--contexts {max(contexts)}: {name} holds at most {limit} tokens and the timed step "
                f"adds one to the context; use a context below {limit}"
            )
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    results: list[dict] = []
    profiles: list[dict] = []
    for name in tqdm(args.models.split(","), desc="models"):
        pdl_modes = tuple(pdl_available("cuda") if m == "default" else m == "on" for m in args.pdl.split(","))
        model = bench_ours(name, batches, contexts, results, bw, pdl_modes, args.step == "tokens", parts)
        report(results, profiles, bw, args.out, args.tag)  # ours first: a cut-off run keeps them
        if args.profile:
            for pb_ in (int(b) for b in args.profile_batches.split(",")):
                profiles += [profile_step(model, name, fused, pb_) for fused in (True, False)]
                for p in profiles[-2:]:
                    print({k: v for k, v in p.items() if k != "sequence_us"}, flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        if args.hf:
            cases = [(1, c) for c in contexts] + [(8, contexts[0])]
            try:
                bench_hf(name, cases, results)
            except Exception as exc:
                print(f"hf failed: {exc!r}", flush=True)
        if args.gptfast:
            try:
                bench_gptfast(
                    args.gptfast,
                    name,
                    [int(x) for x in args.gptfast_batches.split(",")],
                    [int(x) for x in args.gptfast_contexts.split(",")],
                    results,
                )
            except Exception as exc:  # a peer failing must not lose our numbers
                print(f"gpt-fast failed: {exc!r}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        report(results, profiles, bw, args.out, args.tag)


if __name__ == "__main__":
    main()
