"""One model step: the scheduler's plan → packed tensors → decoder → logits of the rows that matter.

The runner owns the KV-cache tensors and knows nothing about requests. Logits
are computed only for rows that will be sampled (the last new token of a
sequence whose chunk reaches its end) and, for prompt logprobs, the prompt rows.
Sampled steps time each layer half through the decoder's `timer` hook.

CUDA graphs (cuda_graphs.py): on CUDA, decode-only steps replay a graph
captured for the smallest batch size >= theirs, unless the step is timed
(per-layer timing needs the eager path). Everything else runs eagerly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fusionserve.kernels.backend import draw_tokens, keep_flagged
from fusionserve.kernels.batch import Draw, PagedBatch, leading_ones
from fusionserve.models.decoder import Decoder, KVCache
from fusionserve.models.layer_timer import LayerTimer
from fusionserve.server.contract import EngineConfig, EngineStartError

if TYPE_CHECKING:
    from fusionserve.server.engine.cuda_graphs import DecodeGraphs
    from fusionserve.server.engine.scheduler import SchedulerOutput


def kv_cache_blocks(config: EngineConfig, decoder: Decoder) -> int:
    """How many KV blocks fit: --kv-cache-gb on CPU; free GPU memory × utilization on CUDA.

    On CUDA this runs after the weights are loaded, and keeps a margin for the
    activations of the largest step (packed tokens × widest layer, plus logits).
    """
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = KVCache.bytes_per_block(decoder.config, config.block_size, decoder.dtype)
    if decoder.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(decoder.device)
        cfg = decoder.config
        width = (
            2 * cfg.intermediate_size
            + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
            + 4 * cfg.hidden_size
        )
        elem = torch.empty((), dtype=decoder.dtype).element_size()
        activations = config.max_num_batched_tokens * width * elem * 4
        # fp32 logits rows: the step's, the sampler's copies, and the CUDA graphs' static buffer for
        # a mixed step's flagged rows (cuda_graphs.DecodeGraphs.flagged)
        activations += config.max_num_seqs * cfg.vocab_size * 4 * 5 + (256 << 20)
        budget = total * config.gpu_memory_utilization - (total - free) - activations
    else:
        budget = config.kv_cache_gb * (1 << 30)
    # Past every sequence at full length (x4 for the prefix cache) more blocks buy nothing but
    # allocator bookkeeping; a tiny model on a large GPU would otherwise get millions.
    useful = 4 * config.max_num_seqs * -(-decoder.max_model_len // config.block_size)
    n = min(int(budget // per_block), useful)
    if n < 1:
        raise EngineStartError(
            f"no room for the KV cache ({budget / 2**20:.0f} MiB available, {per_block} B per block)"
        )
    return n


def context_limit(requested: int | None, decoder: Decoder, cache_tokens: int) -> tuple[int, str]:
    """The engine's max_model_len and why, for the ready line.

    By default the model's full context (Llama-3.1: 131,072) when the KV cache holds one such
    sequence, else the most it holds. A sliding-window model is capped at its window: windowed
    attention is not implemented, and attending past the window would change its answers. An
    explicit --max-model-len beyond what the model or the cache can do is refused, not trimmed.
    """
    cfg = decoder.config
    positions, window = cfg.max_position_embeddings, cfg.sliding_window
    if requested is not None:
        if requested > positions:
            raise EngineStartError(f"--max-model-len {requested} exceeds the model's context ({positions})")
        if window and requested > window:
            raise EngineStartError(
                f"--max-model-len {requested} exceeds the model's sliding window ({window}); "
                "windowed attention is not implemented"
            )
        if requested > cache_tokens:
            raise EngineStartError(
                f"--max-model-len {requested} does not fit the KV cache ({cache_tokens} tokens): "
                "lower it or give the cache more memory"
            )
        return requested, "--max-model-len"
    if window and window < positions:
        limit, why = (
            window,
            f"the model's sliding window; windowed attention is not implemented, context {positions}",
        )
    else:
        limit, why = positions, "the model's full context"
    if cache_tokens < limit:
        return cache_tokens, f"all the KV cache holds; the model supports {limit}"
    return limit, why


def load_decoder(config: EngineConfig) -> tuple[Decoder, Path]:
    """The configured checkpoint as our decoder (the default model is converted once, if needed)."""
    from fusionserve.models.registry import resolve_model

    model_dir = resolve_model(config.model_dir)
    if config.tensor_parallel_size > 1:  # this process leads N ranks (models/tp_group.py)
        from fusionserve.models.tp_group import start_group

        tp_args = (config.device, config.dtype, config.quantization, config.backend, config.max_model_len)
        return start_group(str(model_dir), config.tensor_parallel_size, *tp_args), model_dir
    decoder = Decoder.from_pretrained(
        model_dir,
        device=config.device,
        dtype=config.dtype,
        backend=config.backend,
        quantization=config.quantization,
        max_model_len=config.max_model_len,
    )
    return decoder, model_dir


@dataclass
class StepInputs:
    ids: torch.Tensor
    positions: torch.Tensor
    batch: PagedBatch
    logit_rows: torch.Tensor  # rows of the packed tokens whose logits are computed
    sample_index: list[int | None]  # per planned sequence: its sampled row within logit_rows, or None
    prompt_index: list[tuple[int, int] | None]  # per sequence: (first, count) of its prompt-logprob rows


class ModelRunner:
    def __init__(self, decoder: Decoder, num_blocks: int, block_size: int):
        self.decoder = decoder
        self.device = decoder.device
        self.block_size = block_size
        self.kv: KVCache = decoder.allocate_kv_cache(num_blocks, block_size)
        self.graphs: DecodeGraphs | None = None  # captured decode steps (CUDA only)
        self._pinned: list[torch.Tensor | None] = [None, None]  # host staging buffers (CUDA)
        self._pin_turn = 0

    # -- inputs --------------------------------------------------------------------

    def prepare(
        self,
        plan: SchedulerOutput,
        tokens: list[list[int]],
        num_prompts: list[int],
        prompt_rows: list[bool],
        pending_ids: torch.Tensor | None = None,
        pending_rows: list[int] | None = None,
    ) -> StepInputs:
        """Pack the planned chunks. Row i reads `tokens[i]` (its sequence's ids); `prompt_rows[i]` asks
        for the logits of every prompt position in its chunk (prompt logprobs).

        Launch-ahead: row i with `pending_rows[i] >= 0` is a one-token decode whose input id was
        sampled by the step still in flight and lives only on the device, at
        `pending_ids[pending_rows[i]]`; it is gathered there (queued after that step).

        Built with numpy in one pass: per sequence only O(1) Python work (plus its chunk's token ids);
        on CUDA everything travels in one pinned int64 buffer and one non-blocking copy.
        """
        b, bs = len(plan.seq_ids), self.block_size
        tables = plan.block_tables
        nblk = np.fromiter(map(len, tables), dtype=np.int64, count=b)
        width = max(int(nblk.max()), 1)
        flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int64, count=int(nblk.sum()))
        table_arr = np.full((b, width), -1, dtype=np.int64)
        table_arr[np.arange(width) < nblk[:, None]] = flat
        starts = np.asarray(plan.num_computed, dtype=np.int64)
        ns = np.asarray(plan.num_new_tokens, dtype=np.int64)
        if bool((ns == 1).all()) and not any(prompt_rows):
            host = _decode_rows(tokens, starts, np.asarray(plan.seq_lens, dtype=np.int64))
        else:
            host = _mixed_rows(tokens, starts, ns, plan.seq_lens, num_prompts, prompt_rows)
        ids, positions, rows, logit_rows, sample_index, prompt_index = host
        slots = table_arr[rows, positions // bs] * bs + positions % bs
        query_start = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(ns, out=query_start[1:])
        ends = starts + ns
        gather_dst = gather_src = np.zeros(0, dtype=np.int64)
        if pending_rows is not None:
            src = np.asarray(pending_rows, dtype=np.int64)
            gather_dst = query_start[:-1][src >= 0]  # an item's first (only) token
            gather_src = src[src >= 0]
        parts = (
            ids,
            positions,
            slots,
            logit_rows,
            query_start,
            ends,
            gather_dst,
            gather_src,
            table_arr.reshape(-1),
        )
        ids_t, pos_t, slot_t, logit_t, qs_t, cl_t, dst_t, src_t, tab_t = self._to_device(parts)
        batch = PagedBatch(
            query_start=qs_t.to(torch.int32),
            context_lens=cl_t.to(torch.int32),
            block_tables=tab_t.view(b, width).to(torch.int32),
            slot_mapping=slot_t,
            max_query_len=int(ns.max()),
            max_context_len=int(ends.max()),
            block_size=bs,
            num_decodes=leading_ones(ns),  # decodes lead every plan
        )
        if len(gather_dst):
            ids_t[dst_t] = pending_ids[src_t]
        # The layout the torch attention reads on the host: from our arrays, not a device sync.
        batch.__dict__["host_layout"] = (query_start.tolist(), ends.tolist())
        return StepInputs(ids_t, pos_t, batch, logit_t, sample_index, prompt_index)

    def _to_device(self, parts: tuple[np.ndarray, ...]) -> list[torch.Tensor]:
        """int64 host arrays as tensors on the device: on CUDA through one pinned buffer (two,
        alternating: the previous step's copy may still be in flight) and one copy."""
        if self.device.type == "cpu":
            return [torch.from_numpy(np.ascontiguousarray(p)) for p in parts]
        sizes = [len(p) for p in parts]
        total = sum(sizes)
        self._pin_turn ^= 1
        buf = self._pinned[self._pin_turn]
        if buf is None or buf.numel() < total:
            size = max(total, 2 * (buf.numel() if buf is not None else 0))
            buf = self._pinned[self._pin_turn] = torch.empty(size, dtype=torch.int64, pin_memory=True)
        host = buf.numpy()
        off = 0
        for p, n in zip(parts, sizes):
            host[off : off + n] = p
            off += n
        return list(buf[:total].to(self.device, non_blocking=True).split(sizes))

    # -- execution -----------------------------------------------------------------

    def execute(
        self,
        inputs: StepInputs,
        fused: bool,
        timer: LayerTimer | None = None,
        scaled: bool = True,
        draw: Draw | None = None,
    ) -> torch.Tensor | None:
        """Run the step (K/V written to the cache); logits of `logit_rows`, or None when there are none.

        `scaled=False` lets a fused all-greedy step skip the final-norm row scale. `draw` (one entry
        per logit row): the rows' drawn token ids instead of their logits (FlashSampling).
        """
        if timer is None and inputs.batch.is_decode_only and self.graphs is not None:
            n = inputs.ids.shape[0]
            if self.graphs.fits(n):
                whole = draw is not None and fused and inputs.logit_rows.numel() == n  # drawn in the graph
                out = self.graphs.run(
                    inputs.ids, inputs.positions, inputs.batch, fused, draw if whole else None
                )
                if whole or draw is None:
                    return out[inputs.logit_rows]
                # the same tokens, from written logits (a mixed step's other rows keep theirs)
                return draw_tokens(keep_flagged(out[inputs.logit_rows], draw), draw)
        hidden = self.decoder.forward(inputs.ids, inputs.positions, inputs.batch, self.kv, fused, timer)
        if not inputs.logit_rows.numel():
            return None
        return self.decoder.logits(hidden.rows(inputs.logit_rows), scaled=scaled, draw=draw)

    def make_timer(self) -> LayerTimer:
        return LayerTimer(self.device.type == "cuda")

    def copy_block(self, src: int, dst: int) -> None:
        """Duplicate one block's K/V in every layer (a forked sequence's partly filled block)."""
        for k, v in zip(self.kv.k, self.kv.v):
            k[dst].copy_(k[src])
            v[dst].copy_(v[src])

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- CUDA graphs ---------------------------------------------------------------------

    def prepare_kernels(self, config: EngineConfig, max_model_len: int) -> str:
        """Capture CUDA graphs and warm the eager variants; what the ready line says runs the steps."""
        decoder = self.decoder
        graphs = (
            config.cuda_graphs
            and decoder.device.type == "cuda"
            and config.tensor_parallel_size == 1
            and getattr(decoder.backend, "graph_capturable", False)  # `--backend torch` on a GPU: eager
        )
        if graphs:
            sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b < config.max_num_seqs]
            self.capture_decode_graphs([*sizes, config.max_num_seqs])
            if config.layer_timing_every:
                self.warm_eager_paths(config.max_num_seqs, max_model_len)
            self.warm_prefill_paths(config.max_num_batched_tokens)
        features = ["PDL"] if getattr(decoder.backend, "pdl", False) else []
        features += ["CUDA graphs"] if graphs else []
        if decoder.backend.name == "triton":  # the fused path's epilogue fusions (#22)
            features += ["FlashSampling"] if config.flash_sampling else []
            features += (
                ["RoPE + KV write in the qkv GEMM"] if getattr(decoder.backend, "rope_in_gemm", False) else []
            )
        features += ["FP8 e4m3 weights + per-token activations"] if decoder.config.quantization else []
        return ", ".join([f"{decoder.backend.name} on {decoder.device.type}", *features])

    def capture_decode_graphs(self, batch_sizes: list[int]) -> None:
        """Capture decode steps (both fusion paths) for these padded batch sizes; CUDA only."""
        if self.device.type != "cuda":
            return
        from fusionserve.server.engine.cuda_graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self.decoder, self.kv, max(batch_sizes), tuple(batch_sizes))
        self.graphs.capture()

    @torch.inference_mode()
    def warm_eager_paths(self, max_batch: int, max_context: int) -> None:
        """Run the eager decode variants once so no live step pays a Triton compile.

        Sampled per-layer timing steps run outside CUDA graphs, with the real batch
        size and context length: the attention split plan and the GEMM epilogue
        variants (scaled or not) then differ from the captured ones, and their
        first use would stall that step (measured: hundreds of ms on an H100).
        The warm-up writes nothing (slot -1) and reads only block 0.
        """
        contexts = sorted({1, min(max_context, 200), min(max_context, 3000), max_context})
        sizes = sorted({1, 3, min(max_batch, 17), min(max_batch, 33), max_batch})
        for fused in (True, False):
            for n in sizes:
                for ctx in contexts:
                    self._warm_step(n, ctx, 0, fused)
            # Mixed steps (decodes + a prompt chunk): their decodes' attention variant depends on how
            # many there are (split plan, PDL only when the step is small), not on what was captured.
            for n in sizes:
                for chunk in (8, 40, 200):
                    for ctx in contexts[1:3]:
                        self._warm_step(n, ctx, chunk, fused)
        self.synchronize()

    @torch.inference_mode()
    def warm_prefill_paths(self, max_tokens: int) -> None:
        """One prompt chunk of each large size through both fusion paths before the first request.

        An A/B is only honest if both paths are equally warm. A path's first prefill at a new size
        compiles its large-M Triton variants (integer arguments specialise on divisibility by 16) and
        grows the caching allocator to that path's own peak; TTFT p99 at 8 req/s on an H200 was 50 ms
        fused and 196 ms off (the suspected cause, not yet confirmed on the device). So each path's
        prefill runs here at the step budget and below it, both sides of 16. It writes nothing."""
        chunks = sorted({max_tokens, max(1, max_tokens - 8), min(max_tokens, 512), min(max_tokens, 504)})
        for fused in (True, False):
            for chunk in chunks:
                self._warm_step(0, chunk, chunk, fused)
        self.synchronize()

    def _warm_step(self, n_dec: int, ctx: int, chunk: int, fused: bool) -> None:
        """One eager, timed step of `n_dec` decodes at context `ctx` plus (chunk > 0) a prompt chunk of
        `chunk` tokens; it writes nothing (slot -1) and reads only block 0."""
        dev, bs = self.device, self.block_size
        t = n_dec + chunk
        ctx_all = [ctx] * n_dec + ([chunk] if chunk else [])
        qs = list(range(n_dec + 1)) + ([t] if chunk else [])
        batch = PagedBatch(
            query_start=torch.tensor(qs, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(ctx_all, dtype=torch.int32, device=dev),
            block_tables=torch.zeros((len(ctx_all), -(-max(ctx_all) // bs)), dtype=torch.int32, device=dev),
            slot_mapping=torch.full((t,), -1, dtype=torch.int64, device=dev),
            max_query_len=max(chunk, 1),
            max_context_len=max(ctx_all),
            block_size=bs,
            num_decodes=n_dec,
        )
        pos = torch.cat([torch.full((n_dec,), ctx - 1), torch.arange(chunk)]).to(dev)
        ids = torch.zeros(t, dtype=torch.long, device=dev)
        hidden = self.decoder.forward(ids, pos, batch, self.kv, fused, self.make_timer())
        last = torch.tensor(qs[1:], device=dev) - 1
        for scaled in (True, False) if fused else (True,):  # `scaled` only matters fused
            self.decoder.logits(hidden.rows(last), scaled=scaled)
        if fused:  # FlashSampling's epilogue variants: greedy only or with noise; a mixed step's too
            vocab = self.decoder.config.vocab_size
            for noise in (False, True):
                for mixed in (False, True):
                    temps = torch.full((len(last),), -1.0 if mixed else 0.0, device=dev)
                    logits = torch.empty((len(last), vocab), device=dev) if mixed else None
                    self.decoder.logits(hidden.rows(last), draw=Draw(temps, temps.long(), noise, logits))


def _decode_rows(tokens: list[list[int]], starts: np.ndarray, seq_lens: np.ndarray):
    """One token per row, at position num_computed; a row is sampled iff it reaches its end."""
    b = len(tokens)
    ids = np.fromiter((t[s] for t, s in zip(tokens, starts.tolist())), dtype=np.int64, count=b)
    rows = np.arange(b)
    sampled = starts + 1 == seq_lens
    if sampled.all():
        return ids, starts, rows, rows, list(range(b)), [None] * b
    pos_of = np.cumsum(sampled) - 1
    sample_index = [int(pos_of[i]) if sampled[i] else None for i in range(b)]
    return ids, starts, rows, rows[sampled], sample_index, [None] * b


def _mixed_rows(
    tokens: list[list[int]],
    starts: np.ndarray,
    ns: np.ndarray,
    seq_lens: list[int],
    num_prompts: list[int],
    prompt_rows: list[bool],
):
    """Prompt chunks (and decodes): every chunk's ids; logits for each sampled row and, for prompt
    logprobs, the prompt rows (row p predicts token p + 1)."""
    b = len(tokens)
    ids = np.fromiter(
        itertools.chain.from_iterable(t[s : s + n] for t, s, n in zip(tokens, starts.tolist(), ns.tolist())),
        dtype=np.int64,
        count=int(ns.sum()),
    )
    rows = np.repeat(np.arange(b), ns)
    row0 = np.concatenate(([0], np.cumsum(ns)[:-1]))
    positions = np.arange(len(ids), dtype=np.int64) - np.repeat(row0, ns) + np.repeat(starts, ns)
    logit_list: list[int] = []
    sample_index: list[int | None] = []
    prompt_index: list[tuple[int, int] | None] = []
    for i in range(b):
        start, n, r0 = int(starts[i]), int(ns[i]), int(row0[i])
        end = start + n
        if prompt_rows[i] and start < num_prompts[i] - 1:
            count = min(end, num_prompts[i] - 1) - start
            prompt_index.append((len(logit_list), count))
            logit_list.extend(range(r0, r0 + count))
        else:
            prompt_index.append(None)
        if end == seq_lens[i]:
            sample_index.append(len(logit_list))
            logit_list.append(r0 + n - 1)
        else:
            sample_index.append(None)
    return ids, positions, rows, np.asarray(logit_list, dtype=np.int64), sample_index, prompt_index
