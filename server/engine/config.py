"""The engine's configuration: one frozen record, built by the CLI and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str | None = None  # None → models.registry.default_model_dir()
    served_model_name: str | None = None  # default: folder name
    device: str = "auto"  # auto → cuda if available else cpu
    dtype: str = "auto"  # auto → bf16 on cuda, fp32 on cpu
    backend: str = "auto"  # auto|torch|triton
    max_model_len: int | None = None  # default min(config max positions, 8192)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_gb: float = 1.0  # CPU sizing
    gpu_memory_utilization: float = 0.9  # GPU sizing
    max_queue: int = 256  # waiting requests beyond this → QueueFullError
    enable_prefix_caching: bool = True
    fusion: str = "on"  # on|off|ab
    layer_timing_every: int = 50  # 0 disables per-layer timing
    cuda_graphs: bool = True
    num_kv_blocks: int | None = None  # overrides the memory-based sizing (tests, benchmarks)
    seed: int | None = None  # the shared generator of unseeded requests
    overlap: bool = True  # launch step n+1 before the text/output work of step n (off: debugging)
