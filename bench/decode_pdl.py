"""Backend variants side by side: per-token decode latency with CUDA graphs.

Each variant sets the TritonBackend's `pdl` (a fusionserve.kernels.pdl.PdlPolicy, or False: no PDL) and
`small_m_max` (the largest M that runs our Triton GEMMs with the norm in their epilogues; above it,
cuBLAS + a row pass), captures its own graphs of the same model and KV cache, and all variants are
timed interleaved in one process (best of `--rounds` medians each), so the ratios are side by side.

    python bench/decode_pdl.py --models 8b,135m --batches 1,8 --contexts 512
    python bench/decode_pdl.py --batches 64 --variants "PDL,Triton GEMMs to M=64" --tag m64
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
from fusionserve.kernels.backend import select_backend  # noqa: E402
from fusionserve.kernels.pdl import PdlPolicy  # noqa: E402
from fusionserve.kernels.triton_backend import TritonBackend  # noqa: E402
from fusionserve.models.decoder import Decoder, geometry  # noqa: E402

VARIANTS: dict[str, dict] = {  # the backend attributes of each (unset ones keep the product default)
    "no PDL": dict(pdl=False),
    "PDL": dict(pdl=PdlPolicy()),
    "PDL exit trigger": dict(pdl=PdlPolicy(multiwave_trigger="exit")),
    "PDL one-wave prefetch only": dict(pdl=PdlPolicy(prefetch_multiwave=False)),
    "PDL no prefetch": dict(pdl=PdlPolicy(prefetch_lines_max=0)),
    "PDL 16 MB prefetch": dict(pdl=PdlPolicy(prefetch_budget=16 << 20)),
    "PDL 4 MB prefetch": dict(pdl=PdlPolicy(prefetch_budget=4 << 20)),
    "PDL 2 programs/SM wave": dict(pdl=PdlPolicy(one_wave_programs_per_sm=2)),
    "Triton GEMMs to M=64": dict(small_m_max=64),
    "Triton GEMMs to M=64 no PDL": dict(small_m_max=64, pdl=False),
    "FP8 2x BLOCK_K": dict(fp8_k_factor=2),
}


def apply_variant(backend, variant: dict) -> None:
    defaults = TritonBackend(backend.geometry)
    backend.pdl = variant.get("pdl", defaults.pdl or False)
    backend.small_m_max = variant.get("small_m_max", defaults.small_m_max)
    backend.fp8_k_factor = variant.get("fp8_k_factor", defaults.fp8_k_factor)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="8b,135m")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--contexts", default="512")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    args = ap.parse_args()
    names = args.variants.split(",")
    results = []
    for name in tqdm(args.models.split(","), desc="models"):
        cfg = config_of(name)
        contexts = [int(c) for c in args.contexts.split(",")]
        model = Decoder(
            cfg, random_weights(cfg), select_backend("cuda", geometry(cfg)), max_model_len=max(contexts) + 16
        )
        for ctx in contexts:
            for b in [int(x) for x in args.batches.split(",")]:
                kv = filled_kv_cache(model, b, ctx)
                best = best_of_interleaved(
                    model,
                    kv,
                    b,
                    ctx,
                    {v: VARIANTS[v] for v in names},
                    lambda v, m=model: apply_variant(m.backend, v),
                    rounds=args.rounds,
                )
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
        base = r[f"{names[0]} | fused"]
        for v in names:
            f, o = r[f"{v} | fused"], r[f"{v} | off"]
            rows.append(
                [
                    r["model"],
                    r["batch"],
                    r["ctx"],
                    v,
                    round(f, 4),
                    round(o, 4),
                    f"{100 * (o / f - 1):+.1f}%",
                    f"{base / f:.3f}x",
                ]
            )
    table = (
        f"Backend variants, decode ms/step, {env.get('gpu')}, torch {env['torch']}, triton {env.get('triton')}, "
        f"{env['date']}; CUDA graphs; best of {args.rounds} interleaved medians\n\n"
        + markdown_table(
            ["model", "batch", "ctx", "variant", "fused", "off", "fused gain", f"vs {names[0]} (fused)"], rows
        )
    )
    gpu = "_".join((env.get("gpu") or "gpu").lower().split())
    write_results(
        f"decode_pdl_{gpu}{'_' + args.tag if args.tag else ''}",
        {"env": env, "results": results},
        table,
        out=args.out,
    )
    print(table)


if __name__ == "__main__":
    main()
