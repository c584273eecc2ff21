"""Tile choices of the deferred-norm GEMM (kernels/norm_linear.py) at decode sizes: a table tuned
per shape and per GPU (`python -m bench.kernels --sweep` measures it), and a rule for shapes it does
not list.

Why per GPU: the H100's winners lose to cuBLAS in 11 of 30 decode shapes on the H200 (more bandwidth,
same SMs: other tiles keep enough bytes in flight). `tile_table_for(device, cache_dir)` takes the
table shipped for the device's GPU family (SHIPPED), overlaid with a sweep cached for that exact GPU
(`python -m bench.kernels --sweep --save-tiles` writes $FUSIONSERVE_HOME/tiles/<gpu>.json); a GPU
with neither gets the rule alone."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch

from fusionserve.kernels.triton_env import INTERPRET, next_pow2, sm_count

# ----------------------------------------------------------------------------------------------------
# Tile configs. Decode GEMMs are weight-bandwidth bound: pick BLOCK_N so the grid covers the SMs
# several times over, BLOCK_K and stages so enough weight bytes are in flight per SM.
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K)
Config = tuple[int, int, int, int, int, int]


# Measured winners per (N, K, M bucket, gate_up) on H100 (python -m bench.kernels --sweep); heuristic otherwise.
_H100: dict[tuple[int, int, int, bool], Config] = {
    # H100 80GB HBM3, torch 2.11 / triton 3.6, bench/kernels.py --sweep (CUDA graphs, rotating weights)
    (4096, 14336, 16, False): (16, 16, 128, 2, 4, 2),
    (4096, 14336, 32, False): (32, 32, 128, 4, 4, 2),
    # (4096, 4096) and (6144, 4096) at M <= 16: bench/decode_configs.py (whole 8B step with PDL), two rounds
    (4096, 4096, 16, False): (16, 16, 256, 2, 4, 2),
    (4096, 4096, 32, False): (32, 32, 256, 4, 4, 1),
    (6144, 4096, 16, False): (16, 16, 256, 2, 4, 1),
    (6144, 4096, 32, False): (32, 16, 128, 2, 4, 1),
    (14336, 4096, 16, True): (16, 64, 256, 4, 3, 1),
    (14336, 4096, 32, True): (32, 64, 128, 4, 4, 1),
    (28672, 4096, 16, False): (16, 64, 256, 4, 3, 1),
    (28672, 4096, 32, False): (32, 64, 256, 4, 3, 1),
    (128256, 4096, 16, False): (16, 16, 512, 4, 3, 1),
    (128256, 4096, 32, False): (32, 64, 128, 4, 4, 1),
    (576, 576, 16, False): (16, 16, 64, 4, 6, 1),
    (576, 576, 32, False): (32, 16, 64, 4, 6, 1),
    (576, 1536, 16, False): (16, 32, 64, 4, 6, 4),
    (576, 1536, 32, False): (32, 32, 128, 4, 4, 4),
    (960, 576, 16, False): (16, 16, 64, 4, 6, 1),
    (960, 576, 32, False): (32, 16, 64, 4, 6, 1),
    (1536, 576, 16, True): (16, 32, 64, 4, 6, 1),
    (1536, 576, 32, True): (32, 16, 64, 4, 6, 1),
    (3072, 576, 16, False): (16, 32, 64, 4, 6, 1),
    (3072, 576, 32, False): (32, 32, 64, 4, 6, 1),
    (49152, 576, 16, False): (16, 16, 128, 2, 4, 1),
    (49152, 576, 32, False): (32, 128, 64, 4, 4, 1),
}
# Measured on the H200: the H100 table with these on top (each judged by the whole decode step).
_H200: dict[tuple[int, int, int, bool], Config] = {
    # Pythia-6.9B on the H200 (bench/decode_configs.py, whole step, both paths ~4% faster each):
    # the rule's 16 x 32 tiles lose to 16 x 16 with two warps for the MLP's up projection, and its
    # unsplit down projection to split-K 2 (as Llama's down above)
    (16384, 4096, 16, False): (16, 16, 256, 2, 4, 1),
    (4096, 16384, 16, False): (16, 16, 256, 2, 4, 2),
    # Isolated sweep (bench/results/tiles_sweep_nvidia_h200.json) judged by the whole decode step
    # (bench/decode_configs.py --from-sweep, CUDA graphs + PDL; the other isolated winners slowed the
    # step down, the 8B o_proj's by 4.4%): 8B LM head 4.21 -> 4.12 ms a step (a quarter of the tiles,
    # which FlashSampling's per-tile epilogue also pays for), 8B down +0.6%, 135M LM head +0.8%.
    (128256, 4096, 16, False): (16, 64, 128, 4, 4, 1),
    (4096, 14336, 16, False): (16, 32, 128, 2, 4, 4),
    (49152, 576, 16, False): (16, 128, 64, 4, 4, 1),
}

#: A backend's tile table (TritonBackend.tiles): read-only, so a sweep builds its own table
#: ({**TUNED, key: config}) instead of changing the one every backend reads.
TileTable = Mapping[tuple[int, int, int, bool], Config]
SHIPPED: Mapping[str, TileTable] = MappingProxyType(
    {"H100": MappingProxyType(_H100), "H200": MappingProxyType({**_H100, **_H200})}
)
TUNED: TileTable = SHIPPED["H100"]  # the default where no device is known (tests, sweeps' baseline)

#: FP8-weight decode GEMMs (TritonBackend.fp8_tiles): a table of their own, since one-byte weights
#: want other tiles than the bf16 ones at the same shape; a shape missing here runs the bf16 table's
#: tiles. None shipped yet: `python -m bench.kernels --sweep --fp8 --save-tiles` proposes and
#: `bench/decode_configs.py --model 8b-fp8 --from-sweep ... --save-tiles` caches per GPU.
SHIPPED_FP8: Mapping[str, TileTable] = MappingProxyType(
    {"H100": MappingProxyType({}), "H200": MappingProxyType({})}
)
WEIGHTS = ("bf16", "fp8")  # the tables' weight formats (bf16 also serves fp16 and fp32 weights)


def gpu_family(device_name: str) -> str | None:
    """The SHIPPED key of a CUDA device name ("NVIDIA H200" → "H200"), None for GPUs we have not tuned."""
    upper = device_name.upper()
    return next((fam for fam in ("H200", "H100") if fam in upper), None)


def gpu_slug(device_name: str) -> str:
    """A file name for one exact GPU model ("NVIDIA H100 80GB HBM3" → "nvidia-h100-80gb-hbm3")."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def load_tiles(path: Path) -> dict[tuple[int, int, int, bool], Config]:
    """A cached sweep: [[N, K, M bucket, gate_up, [BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, split]], ...]."""
    return {
        (int(n), int(k), int(bm), bool(gu)): norm_cfg(cfg)
        for n, k, bm, gu, cfg in json.loads(path.read_text())
    }


def save_tiles(path: Path, table: Mapping[tuple[int, int, int, bool], Config]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [[n, k, bm, gu, list(norm_cfg(cfg))] for (n, k, bm, gu), cfg in sorted(table.items())]
    path.write_text(json.dumps(rows, indent=1) + "\n")


def cache_file(cache_dir: Path, device_name: str, weights: str = "bf16") -> Path:
    """Where tiles judged on one GPU model are cached: <gpu>.json (bf16), <gpu>-fp8.json."""
    return cache_dir / f"{gpu_slug(device_name)}{'' if weights == 'bf16' else '-' + weights}.json"


def tile_table_for(
    device: torch.device | str, cache_dir: Path | None = None, weights: str = "bf16"
) -> TileTable:
    """The decode GEMMs' tile table for `device` and weight format: its GPU family's shipped table
    overlaid with the one cached for its exact model under `cache_dir`; TUNED (bf16) or nothing
    (fp8) where there is no CUDA device to ask."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r}: expected one of {WEIGHTS}")
    shipped = SHIPPED if weights == "bf16" else SHIPPED_FP8
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return shipped["H100"]  # TUNED for bf16; nothing for FP8
    name = torch.cuda.get_device_name(device)
    table = dict(shipped.get(gpu_family(name) or "", {}))
    cached = cache_file(cache_dir, name, weights) if cache_dir is not None else None
    if cached is not None and cached.is_file():
        table.update(load_tiles(cached))
    return MappingProxyType(table)


def m_bucket(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def norm_cfg(cfg) -> Config:
    return tuple(cfg) + (1,) * (6 - len(cfg))  # type: ignore[return-value]


def smem_bytes(cfg, elt: int, gate_up: bool) -> int:
    bm, bn, bk, _, stages, _ = norm_cfg(cfg)
    return max(1, stages - 1) * (bm + bn * (2 if gate_up else 1)) * bk * elt


def _fit(cfg, elt: int, gate_up: bool, limit: int = 160 * 1024) -> Config:
    """Shrink stages, then BLOCK_K, until the pipelined tiles fit in shared memory."""
    bm, bn, bk, warps, stages, split = norm_cfg(cfg)
    while smem_bytes((bm, bn, bk, warps, stages), elt, gate_up) > limit:
        if stages > 2:
            stages -= 1
        elif bk > 32:
            bk //= 2
        else:
            break
    return (bm, bn, bk, warps, stages, split)


def pick_config(
    m: int,
    n: int,
    k: int,
    device: torch.device,
    gate_up: bool = False,
    elt: int = 2,
    table: TileTable = TUNED,
) -> Config:
    """n = output columns (I for gate/up). The tuned `table` first, else: enough CTAs to cover the SMs twice,
    two warps for a 16 x 16 tile (the tuned Llama entries' choice; H200, Pythia-1.4B batch 1, whole step:
    the qkv, up and down GEMMs each 4-7% faster than with four)."""
    if INTERPRET or device.type != "cuda":
        return (16, 16, 32, 1, 1, 1)
    bm = m_bucket(m)
    hit = table.get((n, k, bm, gate_up))
    if hit is not None:
        return _fit(hit, elt, gate_up)
    sms = sm_count(device)
    m_tiles = -(-m // bm)
    bn = 16
    for cand in (64, 32):
        if -(-n // cand) * m_tiles >= 2 * sms and cand * (2 if gate_up else 1) <= 128:
            bn = cand
            break
    bk = 256 if bm <= 16 else 128
    if k < bk:
        bk = max(32, next_pow2(k) // 2)
    ctas = -(-n // bn) * m_tiles
    split = 1
    while ctas * split < sms and k // (bk * split * 2) >= 2:
        split *= 2
    warps = 2 if bm <= 16 and bn <= 16 else 4
    return _fit((bm, bn, bk, warps, 4, split), elt, gate_up)
