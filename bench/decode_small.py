"""Decode attention merge variants on the GPU: old two-kernel split merge vs fused merge vs no split.

Part 1 times decode attention alone (bf16, one layer's paged cache, shuffled blocks) as a CUDA graph
of back-to-back calls, median per call, for the 135M and 8B shapes. It is planned as the decode
graphs plan it: for max_context_len = the server's max_model_len (8192), each program reading its
sequence's own length (ctx + 1, the new token included) on the device.

Part 2 times the whole 135M batch-1 decode step (the product's DecodeGraphs replay, as
bench/decode.py does, whose helpers it imports) with each variant, fused and off, and profiles the
ctx-512 step (kernels per step, attention µs per step).

    python bench/decode_small.py [--models 135m,8b] [--batches 1,8,32] [--contexts 512,4096]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, markdown_table, write_results  # noqa: E402
from bench.decode import ARCHS, config_of, decode_batch, graph_kernel_events, random_weights, time_fn  # noqa: E402
from fusionserve.kernels import decode_attention as attn  # noqa: E402
from fusionserve.kernels import triton_env  # noqa: E402
from fusionserve.kernels.backend import select_backend  # noqa: E402
from fusionserve.kernels.decode_attention import DecodeSplitPolicy  # noqa: E402
from fusionserve.models.decoder import Decoder, geometry  # noqa: E402
from fusionserve.server.engine.cuda_graphs import DecodeGraphs  # noqa: E402

MAX_MODEL_LEN = 8192
DEV = "cuda"
# Each variant is a whole policy (the defaults may change with these numbers).
VARIANTS = {
    "two_kernel": DecodeSplitPolicy(fused_merge=False),
    "fused": DecodeSplitPolicy(fused_merge=True),
    "fused_min256": DecodeSplitPolicy(fused_merge=True, min_split_tokens=256),
    "fused_single1024": DecodeSplitPolicy(fused_merge=True, single_split_ctx=1024),
    "nosplit": DecodeSplitPolicy(fused_merge=True, max_splits=1),
}


@contextmanager
def step_variant(model: Decoder, variant: str):
    """The decode-split policy the backend's attention calls use, set for one variant."""
    saved = model.backend.decode_split
    model.backend.decode_split = VARIANTS[variant]
    try:
        yield
    finally:
        model.backend.decode_split = saved


def graph_of(fn, calls: int) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def replay_us(graph: torch.cuda.CUDAGraph, calls: int, reps: int = 15) -> float:
    samples = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        samples.append(s.elapsed_time(e) * 1e3 / calls)
    return statistics.median(samples)


def counters_clean() -> bool:
    return all(int(t.abs().sum()) == 0 for t in triton_env._COUNTERS.values())


def bench_attention(name: str, bsz: int, ctx: int) -> dict:
    a = ARCHS[name]
    hq, hk, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    n_ctx = ctx + 1
    per = -(-n_ctx // 16)
    nb = bsz * per
    k_cache = torch.randn(nb, 16, hk, d, device=DEV, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.zeros(bsz, MAX_MODEL_LEN // 16, dtype=torch.int32, device=DEV)
    tables[:, :per] = torch.randperm(nb, device=DEV).to(torch.int32).view(bsz, per)
    lens = torch.full((bsz,), n_ctx, dtype=torch.int32, device=DEV)
    q = torch.randn(bsz, hq, d, device=DEV, dtype=torch.bfloat16)
    outs = {v: torch.empty_like(q) for v in VARIANTS}
    calls = 20
    row: dict = dict(
        model=name, batch=bsz, ctx=ctx, plan=attn.decode_plan(bsz, hk, MAX_MODEL_LEN, d, q.device)
    )
    graphs = {}
    for v, policy in VARIANTS.items():

        def fn(o=outs[v], policy=policy):
            attn.decode_attention(
                q, k_cache, v_cache, tables, lens, MAX_MODEL_LEN, d**-0.5, out=o, policy=policy
            )

        try:
            graphs[v] = graph_of(fn, calls)
        except Exception as exc:  # one variant failing must not lose the others
            row[f"{v}_error"] = repr(exc)[:300]
    ref = outs.get("two_kernel")
    for v in graphs:
        o = outs[v].float()
        row[f"{v}_maxdiff"] = float((o - ref.float()).abs().max()) if ref is not None else float("nan")
        row[f"{v}_finite"] = bool(torch.isfinite(o).all())
    row["counters_clean"] = counters_clean()
    for _ in range(3):  # interleaved rounds; best median of each
        for v, g in graphs.items():
            row[f"{v}_us"] = min(row.get(f"{v}_us", 1e9), replay_us(g, calls))
    return row


def profile_graph(graphs: DecodeGraphs, ids, pos, pb, fused: bool) -> dict:
    events = graph_kernel_events(graphs, ids, pos, pb, fused)
    attn = [us for name, us in events if "_decode_kernel" in name or "_decode_reduce_kernel" in name]
    return dict(
        kernels_per_step=len(events) / 10,
        attn_kernels_per_step=len(attn) / 10,
        attn_us_per_step=sum(attn) / 10,
        kernel_us_per_step=sum(us for _, us in events) / 10,
    )


def bench_step(contexts: list[int], rows: list[dict], save) -> None:
    cfg = config_of("135m")
    model = Decoder(
        cfg, random_weights(cfg), select_backend("cuda", geometry(cfg)), max_model_len=MAX_MODEL_LEN
    )
    for ctx in contexts:
        kv = model.allocate_kv_cache(-(-(ctx + 1) // 16), 16)
        for t in kv.k + kv.v:
            t.normal_()
        pb, ids, pos = decode_batch(1, ctx, 16)
        graphs = {}
        for v in VARIANTS:
            try:
                with step_variant(model, v):
                    g = DecodeGraphs(model, kv, max_batch=1, batch_sizes=(1,))
                    g.capture()
                graphs[v] = g
            except Exception as exc:
                rows.append(dict(model="135m", batch=1, ctx=ctx, variant=v, error=repr(exc)[:300]))
        ref = graphs["two_kernel"].run(ids, pos, pb, True).float().clone() if "two_kernel" in graphs else None
        res = {v: dict(model="135m", batch=1, ctx=ctx, variant=v) for v in graphs}
        for v, g in graphs.items():
            if ref is not None:
                res[v]["logits_maxdiff"] = float((g.run(ids, pos, pb, True).float() - ref).abs().max())
        for _ in range(2):  # interleaved rounds; best of each
            for v, g in graphs.items():
                for fused in (True, False):
                    t = time_fn(lambda g=g, f=fused, i=ids, q=pos, b=pb: g.run(i, q, b, f)) * 1e3
                    key = "fused_ms" if fused else "off_ms"
                    res[v][key] = min(res[v].get(key, 1e9), t)
        if ctx == contexts[0]:
            for v, g in graphs.items():
                res[v]["profile_fused"] = profile_graph(g, ids, pos, pb, True)
        for r in res.values():
            print(r, flush=True)
        rows += list(res.values())
        save()
        graphs = kv = None
        gc.collect()
        torch.cuda.empty_cache()


def render(attn_rows: list[dict], step_rows: list[dict], env: dict) -> str:
    vs = list(VARIANTS)
    out = (
        f"Decode attention merge variants, {env.get('gpu')}, torch {env['torch']}, triton {env.get('triton')}, "
        f"{env['date']}\n\nVariants: "
        + "; ".join(f"`{v}` {VARIANTS[v]}" for v in vs)
        + f"\n\nDecode attention alone (µs per call, CUDA graph of 20 back-to-back calls, median; bf16; "
        f"planned for max_context_len {MAX_MODEL_LEN}, sequences at ctx + 1; plan = (splits, BLOCK_N))\n\n"
    )
    rows = []
    for r in attn_rows:
        best = min((v for v in vs if f"{v}_us" in r), key=lambda v: r[f"{v}_us"], default="-")
        diff = max((r.get(f"{v}_maxdiff", 0.0) for v in vs), default=0.0)
        rows.append(
            [
                r["model"],
                r["batch"],
                r["ctx"],
                str(r["plan"]),
                *[r.get(f"{v}_us", "-") for v in vs],
                best,
                f"{diff:.1e}",
                r["counters_clean"],
            ]
        )
    out += markdown_table(
        ["model", "batch", "ctx", "plan", *vs, "best", "max abs diff vs two_kernel", "counters 0"], rows
    )
    out += "\n\n135M batch-1 decode step (ms, DecodeGraphs replay, max_model_len 8192; best of 2 medians)\n\n"
    rows = []
    for r in step_rows:
        if "error" in r:
            rows.append([r["ctx"], r["variant"], "error", "-", "-", "-", "-", "-"])
            continue
        p = r.get("profile_fused", {})
        rows.append(
            [
                r["ctx"],
                r["variant"],
                r["fused_ms"],
                r["off_ms"],
                p.get("kernels_per_step", "-"),
                p.get("attn_kernels_per_step", "-"),
                p.get("attn_us_per_step", "-"),
                f"{r.get('logits_maxdiff', float('nan')):.1e}",
            ]
        )
    out += markdown_table(
        [
            "ctx",
            "variant",
            "fused ms",
            "off ms",
            "kernels/step",
            "attn kernels/step",
            "attn µs/step",
            "logits max abs diff",
        ],
        rows,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="135m,8b")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--step-contexts", default="512,4096")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    torch.manual_seed(0)
    env = environment()
    gpu = (env.get("gpu") or "gpu").split()[-1].lower()
    attn_rows: list[dict] = []
    step_rows: list[dict] = []

    def save() -> str:
        payload = {
            "env": env,
            "max_model_len": MAX_MODEL_LEN,
            "variants": VARIANTS,
            "attention": attn_rows,
            "step_135m_b1": step_rows,
        }
        table = render(attn_rows, step_rows, env)
        write_results(f"decode_small_{gpu}", payload, table)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"decode_small_{gpu}.md").write_text(table + "\n")
            (Path(args.out) / f"decode_small_{gpu}.json").write_text(
                json.dumps(payload, indent=2, default=str)
            )
        return table

    with torch.inference_mode():
        for name in args.models.split(","):
            for ctx in [int(x) for x in args.contexts.split(",")]:
                for b in [int(x) for x in args.batches.split(",")]:
                    row = bench_attention(name, b, ctx)
                    print(row, flush=True)
                    attn_rows.append(row)
                    gc.collect()
                    torch.cuda.empty_cache()
            save()
    bench_step([int(x) for x in args.step_contexts.split(",")], step_rows, save)
    print(save())


if __name__ == "__main__":
    main()
