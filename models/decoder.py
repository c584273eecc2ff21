"""Our decoder: a Llama-family transformer whose norms can be deferred.

Two norm paths, chosen per forward call (so the engine can A/B them step by step):
- fusion off: h → rmsnorm (writes normalized x) → GEMM on folded W'.
- fusion on:  h's per-row Σh² comes out of whatever produced h (embedding
  gather, o_proj/down_proj residual epilogue); the next GEMM runs on raw h and
  scales its rows by rsqrt(Σh²/K + ε). The final norm is deferred into the LM head.
All compute goes through one `Backend` object (kernels/backend.py), so the same
model code runs the torch reference on CPU and Triton kernels on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from fusionserve.kernels.backend import Backend, draw_tokens, keep_flagged, select_backend
from fusionserve.kernels.batch import Draw, Geometry, LayerKV, PagedBatch, Rotary
from fusionserve.kernels.fp8 import Fp8Weight
from fusionserve.models.config import ModelConfig
from fusionserve.models.loader import ModelWeights, load_weights
from fusionserve.models.registry import fusionserve_home
from fusionserve.models.tensor_parallel import TensorParallel

# timer(layer, part) → context manager around that part; parts are "attn" and "mlp".
LayerTimer = Callable[[int, str], AbstractContextManager]


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def geometry(config: ModelConfig) -> Geometry:
    """What the backend binds of this model when it is built."""
    return Geometry.of(
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.rms_norm_eps,
        config.layer_norm,
        config.gelu or "none",
        config.quantization == "fp8",
    )


def resolve_device(name: torch.device | str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}")
    return DTYPES[name]


@dataclass
class KVCache:
    """Paged K/V storage, one [num_blocks, block_size, Hk, D] pair per layer."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    block_size: int

    @property
    def num_blocks(self) -> int:
        return int(self.k[0].shape[0])

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * elem


@dataclass
class Hidden:
    """The residual stream after the last block, with its norm partials when fused."""

    h: torch.Tensor
    stats: torch.Tensor | None

    def rows(self, index: torch.Tensor) -> Hidden:
        return Hidden(self.h[index], self.stats[index] if self.stats is not None else None)


class Decoder:
    def __init__(
        self,
        config: ModelConfig,
        weights: ModelWeights,
        backend: Backend,
        max_model_len: int | None = None,
        tp: TensorParallel | None = None,
    ):
        """`tp`: this rank's tensor-parallel group; `config` and `weights` are then its shard
        (models/tensor_parallel.py)."""
        self.config = config
        self.weights = weights
        self.backend = backend
        self.tp = tp
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.max_model_len = min(
            max_model_len or config.max_position_embeddings, config.max_position_embeddings
        )
        if config.sliding_window:
            # We do not implement sliding-window masking; within the window it is plain causal attention.
            self.max_model_len = min(self.max_model_len, config.sliding_window)
        self.cos_sin = config.rope_table(self.max_model_len).to(self.device)
        self.scale = config.head_dim**-0.5

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        backend: str = "auto",
        max_model_len: int | None = None,
        progress: bool = True,
        quantization: str = "auto",
    ) -> Decoder:
        """`device` "auto": CUDA when there is one; `dtype` None / "auto": bf16 on CUDA, fp32 elsewhere;
        `quantization` as models/loader.load_weights takes it."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        config, weights = load_weights(
            model_dir, dtype=dtype, device=device, progress=progress, quantization=quantization
        )
        tiles = fusionserve_home() / "tiles"  # decode-GEMM tiles a sweep cached for this GPU
        return cls(config, weights, select_backend(device, geometry(config), backend, tiles), max_model_len)

    def allocate_kv_cache(self, num_blocks: int, block_size: int = 16) -> KVCache:
        cfg = self.config
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        make = lambda: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        return KVCache(
            k=[make() for _ in range(cfg.num_layers)],
            v=[make() for _ in range(cfg.num_layers)],
            block_size=block_size,
        )

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        batch: PagedBatch,
        kv: KVCache,
        fusion: bool = True,
        timer: LayerTimer | None = None,
    ) -> Hidden:
        """Run all blocks over T packed new tokens; writes their K/V into `kv`."""
        be, w = self.backend, self.weights
        rotary = Rotary(positions, self.cos_sin)
        if self.config.layer_norm:
            return self._forward_layernorm(ids, rotary, batch, kv, fusion, timer)
        h, stats = self.tp.embedding(ids, w.embed, fusion) if self.tp else be.embedding(ids, w.embed, fusion)
        for i, layer in enumerate(w.layers):
            with timer(i, "attn") if timer else nullcontext():
                x, st = (h, stats) if fusion else (be.rmsnorm(h), None)
                layer_kv = LayerKV(kv.k[i], kv.v[i], batch.slot_mapping)
                q = be.attn_input(x, st, layer.w_qkv, layer.b_qkv, rotary, layer_kv)
                o, o_amax = self._attend(q, layer_kv, batch, layer.w_o)
                h, stats = self._project(o.reshape(o.shape[0], -1), layer.w_o, h, fusion, o_amax)
            with timer(i, "mlp") if timer else nullcontext():
                x, st = (h, stats) if fusion else (be.rmsnorm(h), None)
                act, act_st = be.mlp_input(x, st, layer.w_gate_up)
                h, stats = self._project(act, layer.w_down, h, fusion, act_st)
        return Hidden(h, stats)

    def _forward_layernorm(
        self,
        ids: torch.Tensor,
        rotary: Rotary,
        batch: PagedBatch,
        kv: KVCache,
        fusion: bool,
        timer: LayerTimer | None,
    ) -> Hidden:
        """GPT-NeoX blocks. Fused, each producer hands on (Σx, Σ(x − mean)²) of the rows it wrote and
        the consumer GEMM applies the mean and 1/σ in its epilogue; with the parallel residual both
        branches read LayerNorms of the same h, so one set of statistics serves both."""
        be, w, parallel = self.backend, self.weights, self.config.parallel_residual
        h, stats = be.ln_embedding(ids, w.embed, fusion)
        for i, layer in enumerate(w.layers):
            with timer(i, "attn") if timer else nullcontext():
                x, st = (h, stats) if fusion else (be.layernorm(h), None)
                layer_kv = LayerKV(kv.k[i], kv.v[i], batch.slot_mapping)
                q = be.ln_attn_input(x, st, layer.w_qkv, layer.c_qkv, layer.b_qkv, rotary, layer_kv)
                o = be.attention(q, layer_kv, batch).reshape(q.shape[0], -1)
                if parallel:  # h + attn(LN1 h) + mlp(LN2 h): the MLP reads the same h and stats
                    attn_out, _ = be.ln_linear(o, layer.w_o, bias=layer.b_o, residual=h)
                else:
                    h, stats = be.ln_linear(o, layer.w_o, bias=layer.b_o, residual=h, want_stats=fusion)
                    x, st = (h, stats) if fusion else (be.layernorm(h), None)
            with timer(i, "mlp") if timer else nullcontext():
                act = be.gelu_mlp_input(x, st, layer.w_gate_up, layer.c_up, layer.b_up)
                residual = attn_out if parallel else h
                h, stats = be.ln_linear(
                    act, layer.w_down, bias=layer.b_down, residual=residual, want_stats=fusion
                )
        return Hidden(h, stats)

    def _attend(
        self, q: torch.Tensor, kv: LayerKV, batch: PagedBatch, w_o
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention, and for an FP8 o_proj the max|o| partials a decode kernel writes itself (its
        per-token scale: no amax pass); None where the GEMM measures o on its own."""
        if isinstance(w_o, Fp8Weight) and hasattr(self.backend, "attention_with_amax"):
            return self.backend.attention_with_amax(q, kv, batch)
        return self.backend.attention(q, kv, batch), None

    def _project(self, x, weight, residual, fusion: bool, x_stats=None):
        """o_proj / down_proj with the residual add (and, tensor-parallel, the sum over ranks)."""
        if self.tp is not None:
            return self.tp.row_parallel(self.backend, x, weight, residual, fusion, x_stats)
        return self.backend.linear(x, weight, residual=residual, want_stats=fusion, x_stats=x_stats)

    @torch.inference_mode()
    def logits(self, hidden: Hidden, scaled: bool = True, draw: Draw | None = None) -> torch.Tensor:
        """fp32 logits from the LM head with the final norm: deferred (row scale in the epilogue, in
        fp32) when the hidden carries stats.

        `scaled=False` skips the positive per-row scale entirely, which greedy
        argmax does not need (only valid on the fused path). `draw`: the [M] tokens drawn from those
        logits instead, by the LM head's own epilogue where it can (FlashSampling,
        kernels/sampling.py); tensor-parallel, from the gathered logits.
        """
        be = self.backend
        if self.tp is not None and draw is not None:
            return draw_tokens(keep_flagged(self.logits(hidden, scaled), draw), draw)
        if self.config.layer_norm:  # the folded bias makes the scale matter even for argmax
            w = self.weights
            x = hidden.h if hidden.stats is not None else be.layernorm(hidden.h)
            return be.ln_lm_head(x, hidden.stats, w.lm_head, w.c_head, w.b_head, draw=draw)
        if hidden.stats is not None:
            out = be.lm_head(hidden.h, self.weights.lm_head, hidden.stats if scaled else None, draw=draw)
        else:
            out = be.lm_head(be.rmsnorm(hidden.h), self.weights.lm_head, draw=draw)
        return self.tp.gather_logits(out) if self.tp is not None else out
