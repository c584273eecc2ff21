"""Programmatic dependent launch policies side by side: per-token decode latency with CUDA graphs.

Each variant is a kernels.pdl.PdlPolicy (or False: no PDL) set on the backend, captures its own graphs of the same model and KV cache, and all variants are timed interleaved in one
process (best of `--rounds` medians each), so the ratios are side by side.

    python bench/decode_pdl.py --models 8b,135m --batches 1,8 --contexts 512
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, markdown_table, write_results  # noqa: E402
from bench.decode import best_of_interleaved, config_of, filled_kv_cache, random_weights  # noqa: E402
from kernels.backend import select_backend  # noqa: E402
from kernels.pdl import PdlPolicy  # noqa: E402
from models.decoder import Decoder  # noqa: E402

VARIANTS: dict[str, PdlPolicy | bool] = {  # the backend's `pdl` for each
    "no PDL": False,
    "PDL": PdlPolicy(),
    "PDL exit trigger": PdlPolicy(multiwave_trigger="exit"),
    "PDL one-wave prefetch only": PdlPolicy(prefetch_multiwave=False),
    "PDL 16 MB prefetch": PdlPolicy(prefetch_budget=16 << 20),
    "PDL 4 MB prefetch": PdlPolicy(prefetch_budget=4 << 20),
    "PDL 2 programs/SM wave": PdlPolicy(one_wave_programs_per_sm=2),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="8b,135m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--contexts", default="512")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    names = args.variants.split(",")
    results = []
    for name in tqdm(args.models.split(","), desc="models"):
        cfg = config_of(name)
        contexts = [int(c) for c in args.contexts.split(",")]
        model = Decoder(cfg, random_weights(cfg), select_backend("cuda"), max_model_len=max(contexts) + 16)
        for ctx in contexts:
            for b in [int(x) for x in args.batches.split(",")]:
                kv = filled_kv_cache(model, b, ctx)
                best = best_of_interleaved(
                    model, kv, b, ctx, {v: VARIANTS[v] for v in names}, lambda p, m=model: setattr(m.backend, "pdl", p),
                    rounds=args.rounds,
                )  # fmt: skip
                row = dict(model=name, batch=b, ctx=ctx)
                row.update({f"{v} | {'fused' if fused else 'off'}": ms for (v, fused), ms in best.items()})
                results.append(row)
                print(row, flush=True)
                kv = None
                gc.collect()
                torch.cuda.empty_cache()
        del model
        gc.collect()
        torch.cuda.empty_cache()
    env = environment()
    rows = []
    for r in results:
        base = r["no PDL | fused"] if "no PDL | fused" in r else None
        for v in names:
            f, o = r[f"{v} | fused"], r[f"{v} | off"]
            rows.append([r["model"], r["batch"], r["ctx"], v, round(f, 4), round(o, 4),
                         f"{100 * (o / f - 1):+.1f}%", f"{base / f:.3f}x" if base else "-"])  # fmt: skip
    table = (
        f"PDL policies, decode ms/step, {env.get('gpu')}, torch {env['torch']}, triton {env.get('triton')}, "
        f"{env['date']}; CUDA graphs; best of {args.rounds} interleaved medians\n\n"
        + markdown_table(
            ["model", "batch", "ctx", "variant", "fused", "off", "fused gain", "vs no PDL"], rows
        )
    )
    gpu = "_".join((env.get("gpu") or "gpu").lower().split())
    write_results(f"decode_pdl_{gpu}", {"env": env, "results": results}, table, out=args.out)
    print(table)


if __name__ == "__main__":
    main()
