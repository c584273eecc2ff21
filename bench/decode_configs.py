"""Decode GEMM tile configs judged by the whole decode step (CUDA graphs, PDL as in the product).

bench/kernels.py --sweep picks tiles per GEMM in isolation; with programmatic dependent launch a
grid's size also decides whether it overlaps its neighbours (one wave: early launch + prefetch), so
this replaces one entry of the backend's tile table at a time and times the full step against the baseline, interleaved in
one process (best of `--rounds` medians each).

    python bench/decode_configs.py --model 8b --batch 1 --ctx 512
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path
from types import MappingProxyType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, markdown_table, write_results  # noqa: E402
from bench.decode import best_of_interleaved, config_of, filled_kv_cache, random_weights  # noqa: E402
from fusionserve.kernels import tile_configs  # noqa: E402
from fusionserve.kernels.backend import select_backend  # noqa: E402
from fusionserve.models.decoder import Decoder, geometry  # noqa: E402

# (N, K, M bucket, gate_up) -> alternatives (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SPLIT_K)
CANDIDATES = {
    "8b": {
        (6144, 4096, 16, False): [(16, 16, 256, 2, 4, 1), (16, 16, 128, 2, 6, 1), (16, 32, 256, 4, 4, 1)],
        (4096, 4096, 16, False): [(16, 16, 128, 2, 6, 1), (16, 16, 512, 4, 3, 1), (16, 16, 256, 2, 4, 2)],
        (4096, 14336, 16, False): [(16, 16, 256, 2, 4, 2), (16, 16, 128, 2, 6, 2), (16, 16, 128, 2, 4, 4)],
        (128256, 4096, 16, False): [(16, 32, 256, 4, 4, 1), (16, 16, 256, 2, 4, 1)],
    },
    "135m": {
        (960, 576, 16, False): [(16, 32, 64, 4, 6, 1), (16, 16, 64, 2, 6, 1)],
        (576, 576, 16, False): [(16, 32, 64, 4, 6, 1), (16, 16, 64, 4, 6, 2)],
        (1536, 576, 16, True): [(16, 16, 64, 4, 6, 1), (16, 64, 64, 4, 6, 1)],
        (576, 1536, 16, False): [(16, 16, 64, 4, 6, 4), (16, 32, 64, 4, 6, 2), (16, 16, 128, 4, 4, 2)],
    },
    "pythia-1.4b": {  # the rule's picks: (16,16,256,2,4,s), s = 1 (qkv, up) or 2 (o, down)
        (2048, 8192, 16, False): [(16, 16, 256, 4, 4, 2), (16, 16, 128, 2, 6, 2), (16, 16, 256, 2, 4, 4)],
        (6144, 2048, 16, False): [(16, 32, 256, 4, 4, 1), (16, 16, 128, 2, 6, 1)],
        (2048, 2048, 16, False): [(16, 16, 256, 2, 4, 1), (16, 16, 128, 2, 6, 2)],
        (8192, 2048, 16, False): [(16, 32, 256, 4, 4, 1), (16, 16, 128, 2, 6, 1)],
        (50304, 2048, 16, False): [(16, 16, 512, 4, 3, 1), (16, 32, 256, 4, 4, 1)],
    },
    "pythia-6.9b": {  # the rule's picks: qkv, up (16,32,256,4,4,1); down (16,16,256,2,4,1)
        (12288, 4096, 16, False): [(16, 16, 256, 2, 4, 1), (16, 64, 256, 4, 3, 1)],
        (16384, 4096, 16, False): [(16, 16, 256, 2, 4, 1), (16, 64, 256, 4, 3, 1)],
        (4096, 16384, 16, False): [(16, 16, 256, 2, 4, 2), (16, 16, 128, 2, 4, 2)],
        (50432, 4096, 16, False): [(16, 16, 512, 4, 3, 1), (16, 32, 256, 4, 4, 1)],
    },
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--paths", default="fused", help="fused, off or fused,off: the table serves both")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    cfg = config_of(args.model)
    model = Decoder(
        cfg, random_weights(cfg), select_backend("cuda", geometry(cfg)), max_model_len=args.ctx + 16
    )
    kv = filled_kv_cache(model, args.batch, args.ctx)
    variants: dict[str, tuple | None] = {"baseline": None}
    for key, alts in CANDIDATES[args.model].items():
        variants.update({f"{key[:2]}{' gate_up' if key[3] else ''} -> {alt}": (key, alt) for alt in alts})

    def apply(replacement: tuple | None, backend=model.backend) -> None:
        """The backend's tile table for one variant (captured into that variant's graphs)."""
        tiles = dict(tile_configs.TUNED)
        if replacement is not None:
            tiles[replacement[0]] = replacement[1]
        backend.tiles = MappingProxyType(tiles)

    paths = tuple(p == "fused" for p in args.paths.split(","))
    timed = best_of_interleaved(model, kv, args.batch, args.ctx, variants, apply, paths, args.rounds)
    apply(None)
    best = {f"{name}{'' if fused else ' [off]'}": ms for (name, fused), ms in timed.items()}
    rows = []
    for (name, fused), ms in timed.items():
        base = timed[("baseline", fused)]
        rows.append([name, "fused" if fused else "off", round(ms, 4), f"{100 * (base / ms - 1):+.2f}%"])
    env = environment()
    table = (
        f"Decode step (ms) with one GEMM's tiles replaced, {args.model} batch {args.batch} ctx {args.ctx}, "
        f"{env.get('gpu')}, torch {env['torch']}, triton {env.get('triton')}, {env['date']}; CUDA graphs, "
        f"PDL as in the product; best of {args.rounds} interleaved medians\n\n"
        + markdown_table(
            ["variant (N, K) -> (BM, BN, BK, warps, stages, split)", "path", "ms", "vs baseline"], rows
        )
    )
    gpu = "_".join((env.get("gpu") or "gpu").lower().split())
    write_results(
        f"decode_configs_{args.model}_b{args.batch}_{gpu}", {"env": env, "ms": best}, table, out=args.out
    )
    print(table)
    del kv, model
    gc.collect()
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
