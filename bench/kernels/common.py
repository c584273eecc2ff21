"""What every kernel benchmark shares: the model shapes, a CUDA-graph timer over rotating weights (so L2
cannot serve them), the GPU's copy bandwidth, and random paged KV caches."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import copy_bandwidth
from fusionserve.kernels.batch import Geometry

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int

    @property
    def geometry(self) -> Geometry:
        return Geometry.of(self.heads, self.kv_heads, self.head_dim, EPS)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """GEMM name → (N, K), weights [N, K]."""
        d = self.head_dim
        return {
            "qkv": ((self.heads + 2 * self.kv_heads) * d, self.hidden),
            "o": (self.hidden, self.heads * d),
            "gate_up": (2 * self.inter, self.hidden),
            "down": (self.hidden, self.inter),
            "lm_head": (self.vocab, self.hidden),
        }


LLAMA_8B = Model("llama3.1-8b", 4096, 32, 8, 128, 14336, 128256)


SMOL_135M = Model("smollm2-135m", 576, 9, 3, 64, 1536, 49152)


TINY = Model("tiny", 48, 4, 2, 12, 40, 100)


EPS = 1e-5


ROTATE_BYTES = 256 << 20  # rotation set per op: 5x the H100's 50 MB L2


def _rand(*shape, dtype, device, scale=1.0):
    return torch.randn(*shape, device=device, dtype=torch.float32).mul_(scale).to(dtype)


class Timer:
    """Median µs per call of ops captured into CUDA graphs (CPU: a plain wall-clock run, --dry).

    `compare` captures one graph per variant and replays them round-robin, so clock or thermal
    drift hits every variant alike: ratios are measured side by side.
    """

    def __init__(self, device: torch.device, replays: int, min_calls: int):
        self.device = device
        self.replays = replays
        self.min_calls = min_calls

    def _graph(self, calls: list):
        for c in calls[: min(len(calls), 2)]:
            c()  # compile / allocate outside the graph
        torch.cuda.synchronize()
        reps = len(calls) * max(1, math.ceil(self.min_calls / len(calls)))
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            calls[0]()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for r in range(reps):
                calls[r % len(calls)]()
        g.replay()
        torch.cuda.synchronize()
        return g, reps

    def compare(self, variants: dict[str, list]) -> dict[str, float]:
        if self.device.type != "cuda":
            out = {}
            for name, calls in variants.items():
                t = time.perf_counter()
                calls[0]()
                out[name] = (time.perf_counter() - t) * 1e6
            return out
        graphs = {name: self._graph(calls) for name, calls in variants.items()}
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        inner = {}
        for name, (g, _) in graphs.items():  # keep each measurement >= ~1 ms, the total bounded
            t0.record()
            g.replay()
            t1.record()
            t1.synchronize()
            inner[name] = max(1, min(20, int(1.0 / max(t0.elapsed_time(t1), 1e-3))))
        times: dict[str, list[float]] = {name: [] for name in graphs}
        for _ in range(self.replays):
            for name, (g, reps) in graphs.items():
                t0.record()
                for _ in range(inner[name]):
                    g.replay()
                t1.record()
                t1.synchronize()
                times[name].append(t0.elapsed_time(t1) * 1e3 / (inner[name] * reps))
        del graphs
        return {name: statistics.median(ts) for name, ts in times.items()}

    def __call__(self, calls: list) -> float:
        return self.compare({"x": calls})["x"]


def n_sets(bytes_per_set: int, cap: int = 256) -> int:
    return max(2, min(cap, math.ceil(ROTATE_BYTES / max(1, bytes_per_set))))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def copy_bandwidth_gbs(device) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written."""
    return copy_bandwidth(1 << 30) / 1e9 if device.type == "cuda" else float("nan")


SWEEP = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages); split-K added where the grid is too small
    (16, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 4), (32, 256, 4, 4), (32, 512, 8, 3), (64, 128, 4, 4),
    (64, 256, 4, 3), (128, 64, 4, 4), (16, 64, 4, 6), (32, 64, 4, 6), (16, 128, 2, 4), (32, 128, 2, 4),
]  # fmt: skip


def _paged(bsz, ctx, hk, d, dtype, device, bs=16):
    """Caches and a decode batch whose sequences own shuffled blocks."""
    per = -(-ctx // bs)
    nb = bsz * per
    k_cache = _rand(nb, bs, hk, d, dtype=dtype, device=device)
    v_cache = _rand(nb, bs, hk, d, dtype=dtype, device=device)
    perm = torch.randperm(nb, device=device).to(torch.int32)
    tables = perm.view(bsz, per)
    return k_cache, v_cache, tables
