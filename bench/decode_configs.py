"""Decode GEMM tile configs judged by the whole decode step (CUDA graphs, PDL as in the product).

bench/kernels.py --sweep picks tiles per GEMM in isolation; with programmatic dependent launch a
grid's size also decides whether it overlaps its neighbours (one wave: early launch + prefetch), so
this replaces one entry of the backend's tile table at a time and times the full step against the baseline, interleaved in
one process (best of `--rounds` medians each). The baseline is the table shipped for this GPU
(kernels/tile_configs.SHIPPED).

    python bench/decode_configs.py --model 8b --batch 1 --ctx 512
    python bench/decode_configs.py --model 8b --batch 1 --from-sweep <tiles.json> --save-tiles

`--from-sweep` takes its alternatives from an isolated sweep (`python -m bench.kernels --sweep
--save-tiles` writes one): every entry of the batch's M bucket that differs from the shipped table.
`--save-tiles` then times the winners (≥ 0.3% each) together against the baseline and caches what
made the whole step faster for this GPU model ($FUSIONSERVE_HOME/tiles/<gpu>.json, which the server
reads over the shipped table): an isolated winner that slows the step down is never cached. A "-fp8"
model (`--model 8b-fp8`, with a sweep of `python -m bench.kernels --sweep --fp8 --save-tiles`) tunes
the FP8 block GEMMs' own table the same way (<gpu>-fp8.json; the bf16 LM head keeps its tiles).
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
from bench.decode import TILE_CACHE, best_of_interleaved, config_of, filled_kv_cache, random_weights  # noqa: E402
from fusionserve.kernels import tile_configs  # noqa: E402
from fusionserve.kernels.backend import select_backend  # noqa: E402
from fusionserve.models.decoder import Decoder, geometry  # noqa: E402

MIN_GAIN = 0.003  # a swap must speed the step up by this much to count as a winner

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


def weights_of(args) -> str:
    """The tile table a model's block GEMMs read: "fp8" for a "-fp8" shape (e.g. 8b-fp8), else "bf16"."""
    return "fp8" if args.model.endswith("-fp8") else "bf16"


def gemm_shapes(cfg) -> set[tuple[int, int]]:
    """(N, K) of every decode GEMM of a Llama-style block and its LM head (the tile table's keys)."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    return {(qkv, h), (h, cfg.num_heads * d), (i, h), (2 * i, h), (h, i), (cfg.vocab_size, h)}


def sweep_candidates(path: Path, shipped, m_bucket: int, shapes: set[tuple[int, int]]) -> dict:
    """The entries of a cached sweep for this model's GEMMs and one M bucket that differ from the
    shipped table."""
    swept = tile_configs.load_tiles(path)
    return {
        key: [cfg]
        for key, cfg in swept.items()
        if key[2] == m_bucket and key[:2] in shapes and shipped.get(key) != cfg
    }


def save_winners(model, kv, args, variants: dict, timed: dict, apply, fused: bool) -> dict:
    """Time the per-entry winners together against the baseline; cache them for this GPU if the whole
    step is faster with them (else the single best swap, if any). Returns what was cached."""
    base = timed[("baseline", fused)]
    swaps = sorted((ms, name) for (name, f), ms in timed.items() if f == fused and name != "baseline")
    winners = [(variants[name], ms) for ms, name in swaps if ms < base * (1 - MIN_GAIN)]
    chosen: dict = {}
    if len(winners) > 1:
        together = {key: cfg for (key, cfg), _ in winners}
        check = best_of_interleaved(
            model,
            kv,
            args.batch,
            args.ctx,
            {"baseline": None, "together": together},
            apply,
            (fused,),
            args.rounds,
        )
        print(f"winners together: {check}", flush=True)
        if check[("together", fused)] < min(check[("baseline", fused)], winners[0][1]):
            chosen = together
    if not chosen and winners:
        chosen = dict([winners[0][0]])
    if chosen:
        path = tile_configs.cache_file(TILE_CACHE, torch.cuda.get_device_name(), weights_of(args))
        old = tile_configs.load_tiles(path) if path.is_file() else {}
        judged = {v[0] for v in variants.values() if isinstance(v, tuple)}  # this model's losers drop out
        old = {k: v for k, v in old.items() if k not in judged}
        tile_configs.save_tiles(path, {**old, **chosen})
        print(f"cached {len(chosen)} whole-step winners in {path}", flush=True)
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--paths", default="fused", help="fused, off or fused,off: the table serves both")
    ap.add_argument("--from-sweep", default=None, help="a tile cache of bench.kernels --sweep --save-tiles")
    ap.add_argument("--save-tiles", action="store_true", help="cache the whole-step winners for this GPU")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    cfg = config_of(args.model)
    shipped = tile_configs.tile_table_for("cuda", weights=weights_of(args))  # no cached table
    model = Decoder(
        cfg, random_weights(cfg), select_backend("cuda", geometry(cfg)), max_model_len=args.ctx + 16
    )
    kv = filled_kv_cache(model, args.batch, args.ctx)
    bucket = tile_configs.m_bucket(args.batch)
    if args.from_sweep:
        candidates = sweep_candidates(Path(args.from_sweep), shipped, bucket, gemm_shapes(cfg))
    else:
        candidates = CANDIDATES[args.model]
    variants: dict[str, tuple | None] = {"baseline": None}  # name → (key, config) swapped in
    for key, alts in candidates.items():
        variants.update({f"{key[:2]}{' gate_up' if key[3] else ''} -> {alt}": (key, alt) for alt in alts})
    print(f"{len(variants) - 1} alternatives to the shipped table", flush=True)

    def apply(replacement, backend=model.backend) -> None:
        """The backend's tile table for one variant (captured into that variant's graphs): one swapped
        entry (key, config), several ({key: config}), or none. An FP8 model's block GEMMs read
        fp8_tiles (its LM head, bf16, keeps `tiles`)."""
        tiles = dict(shipped)
        if isinstance(replacement, dict):
            tiles.update(replacement)
        elif replacement is not None:
            tiles[replacement[0]] = replacement[1]
        setattr(backend, "fp8_tiles" if weights_of(args) == "fp8" else "tiles", MappingProxyType(tiles))

    paths = tuple(p == "fused" for p in args.paths.split(","))
    timed = best_of_interleaved(model, kv, args.batch, args.ctx, variants, apply, paths, args.rounds)
    chosen = save_winners(model, kv, args, variants, timed, apply, paths[0]) if args.save_tiles else {}
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
        f"PDL as in the product; baseline: the table shipped for this GPU; best of {args.rounds} "
        f"interleaved medians\n\n"
        + markdown_table(
            ["variant (N, K) -> (BM, BN, BK, warps, stages, split)", "path", "ms", "vs baseline"], rows
        )
    )
    if args.save_tiles:
        table += f"\n\nCached for this GPU: {chosen or 'nothing (no swap sped the step up)'}\n"
    gpu = "_".join((env.get("gpu") or "gpu").lower().split())
    saved = {"env": env, "ms": best, "cached": [[list(k), list(v)] for k, v in chosen.items()]}
    write_results(f"decode_configs_{args.model}_b{args.batch}_{gpu}", saved, table, out=args.out)
    print(table)
    del kv, model
    gc.collect()
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
