"""Plain-torch versions of every kernel: the CPU serving path and the tests' oracle.

Each function here states the exact math its Triton twin must reproduce. The
deferred-norm contract (docs/DESIGN.md, "The deferred-norm contract"): a producer may emit per-row
*partial* sums of squares of the rows it writes, shaped [T, P] in fp32; a
consumer given such `row_stats` multiplies its output rows by
rsqrt(sum(row_stats, -1) / K + eps) before adding bias/residual. The reference
uses P = 1; Triton producers use one column per output tile. A producer may also
hand on the rows it wrote as they are ([T, K], any dtype: `stats_are_rows`),
leaving the squares to the consumer (the Triton backend's cuBLAS path at
medium M, where the consumers read each row anyway).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusionserve.kernels.batch import Geometry, LayerKV, PagedBatch, Rotary
from fusionserve.kernels.fp8 import Fp8Weight, fp8_matmul


def row_sumsq(x: torch.Tensor) -> torch.Tensor:
    """Per-row sum of squares in fp32, as one partial: [T, 1]."""
    xf = x.float()
    return torch.linalg.vecdot(xf, xf).unsqueeze(-1)


def stats_are_rows(row_stats: torch.Tensor, k: int) -> bool:
    """`row_stats` of K columns are the rows of x themselves, not partial sums (a producer emits at most
    one partial per 16 output columns): the consumer squares and sums them. The Triton backend hands
    the rows on at medium M, where a separate Σx² pass would cost a launch per norm."""
    return k > 1 and row_stats.shape[-1] == k


def row_rsqrt(row_stats: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """The deferred RMSNorm scale 1/rms(x) for each row, from the producer's partials (or the rows of x,
    see stats_are_rows): [T, 1] fp32."""
    if stats_are_rows(row_stats, k):
        total = row_sumsq(row_stats)
    else:
        total = row_stats if row_stats.shape[-1] == 1 else row_stats.sum(-1, keepdim=True)
    return torch.rsqrt(total / k + eps)


def rmsnorm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The explicit norm of the 'off' path; gains are normally folded into the next weight (weight=None)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def embedding(
    ids: torch.Tensor, table: torch.Tensor, want_stats: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gather rows; layer 0's norm statistic comes out of the gather itself when fused."""
    x = F.embedding(ids, table)
    return x, (row_sumsq(x) if want_stats else None)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    row_stats: torch.Tensor | None = None,
    eps: float = 1e-6,
    want_stats: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = [rsqrt-scale] * (x @ W^T) + bias + residual, with optional sum-of-squares partials of y.

    Weight layout is [N, K] as in checkpoints. Accumulates in fp32 and rounds
    once, like a GEMM epilogue, to `out_dtype` (default x's; the LM head keeps fp32).
    Stats are taken from the rounded y, i.e. from exactly what the next norm would read. An FP8
    weight (kernels/fp8.py) quantizes x per row first; r composes with s_x · s_w.
    """
    if isinstance(weight, Fp8Weight):
        acc = fp8_matmul(x, weight)
    elif x.dtype == torch.float32 and weight.dtype == torch.float32:
        acc = x @ weight.t()
    else:
        acc = x.float() @ weight.float().t()
    # acc is this function's own fresh tensor: the epilogue updates it in place.
    if row_stats is not None:
        acc.mul_(row_rsqrt(row_stats, x.shape[-1], eps))
    if bias is not None:
        acc.add_(bias)
    if residual is not None:
        acc.add_(residual)
    y = acc.to(out_dtype or x.dtype)
    return y, (row_sumsq(y) if want_stats else None)


def lm_head(
    x: torch.Tensor, weight: torch.Tensor, row_stats: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """Logits [M, V] in fp32 straight from the fp32 accumulator, the deferred final-norm scale applied
    in fp32: bf16 logits would move logprobs in steps of ~0.25 nats at typical logit sizes and turn
    near-ties into exact ties for greedy decoding."""
    return linear(x, weight, row_stats=row_stats, eps=eps, out_dtype=torch.float32)[0]


_MASK32 = 0xFFFFFFFF


def philox_uniform(keys: torch.Tensor, n: int, rounds: int = 10) -> torch.Tensor:
    """kernels/sampling.philox_uniform for counters 0..n-1 under each row's int64 key: [M, n] fp32 in
    (0, 1), bit for bit. uint32 arithmetic in int64 (products wrap mod 2⁶⁴; the bits kept are exact)."""
    keys = keys.to(torch.int64).view(-1, 1)
    c0 = torch.arange(n, device=keys.device, dtype=torch.int64).view(1, -1).expand(keys.shape[0], n)
    c1 = c2 = c3 = torch.zeros_like(c0)
    k0, k1 = keys & _MASK32, (keys >> 32) & _MASK32
    for _ in range(rounds):
        p0, p2 = c0 * 0xD2511F53, c2 * 0xCD9E8D57
        c0, c2, c1, c3 = (
            ((p2 >> 32) & _MASK32) ^ c1 ^ k0,
            ((p0 >> 32) & _MASK32) ^ c3 ^ k1,
            p2 & _MASK32,
            p0 & _MASK32,
        )
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return ((c0 >> 9).to(torch.float32) + 0.5) * 1.1920928955078125e-07


def gumbel_argmax(logits: torch.Tensor, temps: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """argmax(z / T + g) per row (g: Gumbel noise of the row's Philox key and the token id), argmax z
    where T = 0: an exact draw from softmax(z / T) (kernels/sampling.py). Ties: the first maximum."""
    z = logits.float()
    t = temps.to(device=z.device, dtype=torch.float32).view(-1, 1)
    random = t > 0
    if not bool(random.any()):
        return z.argmax(dim=-1)
    u = philox_uniform(keys.to(z.device), z.shape[1])
    g = -torch.log(-torch.log(u))
    return torch.where(random, z / torch.where(random, t, 1.0) + g, z).argmax(dim=-1)


def token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: every logit of row rows[i] whose bit in bitmask[i] (int32 words, bit t%32 of word
    t//32) is clear becomes -inf; columns past the mask too (kernels/token_bitmask.py)."""
    if rows.numel() == 0:
        return
    v = logits.shape[1]
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)  # [n, 32 * words]
    if allowed.shape[1] < v:
        allowed = torch.cat([allowed, allowed.new_zeros(allowed.shape[0], v - allowed.shape[1])], 1)
    sub = logits[rows.long()]
    sub.masked_fill_(~allowed[:, :v].to(logits.device), float("-inf"))
    logits[rows.long()] = sub


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for a [T, 2I] tensor holding gate then up."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return F.silu(gate).mul_(up).to(gate_up.dtype)


def gate_up_silu(
    x: torch.Tensor, w_gate_up: torch.Tensor, row_stats: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """The MLP's input half: (deferred-)normed x → gate/up GEMM → silu(gate)*up."""
    gu, _ = linear(x, w_gate_up, row_stats=row_stats, eps=eps)
    return silu_mul(gu)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding in HF's half-split layout.

    q [T, Hq, D], k [T, Hk, D]; cos_sin [max_pos, R] fp32 holding cos in the first R/2 columns and
    sin in the last R/2: the first R dims of each head rotate (R = D but for partial rotary), the
    rest pass through.
    """
    rot = cos_sin.shape[-1]  # the leading dims that rotate (GPT-NeoX: a fraction of the head)
    half = rot // 2
    cs = cos_sin[positions.long()]
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]

    def rotate(t: torch.Tensor) -> torch.Tensor:
        tf = t.float()
        a, b = tf[..., :half], tf[..., half:rot]
        return torch.cat((a * cos - b * sin, b * cos + a * sin, tf[..., rot:]), dim=-1).to(t.dtype)

    return rotate(q), rotate(k)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter new keys/values into paged caches [num_blocks, block_size, Hk, D]; negative slots are skipped."""
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    flat_k.index_copy_(0, slots, k.to(k_cache.dtype))
    flat_v.index_copy_(0, slots, v.to(v_cache.dtype))


def attn_input(
    x: torch.Tensor,
    row_stats: torch.Tensor | None,
    w_qkv: torch.Tensor,
    b_qkv: torch.Tensor | None,
    rotary: Rotary,
    kv: LayerKV,
    geom: Geometry,
) -> torch.Tensor:
    """The attention's input half: qkv GEMM (deferred norm) → RoPE → KV-cache write; returns q [T, Hq, D]."""
    qkv, _ = linear(x, w_qkv, bias=b_qkv, row_stats=row_stats, eps=geom.eps)
    return rope_kv_write(qkv, rotary, kv, geom)


def rope_kv_write(qkv: torch.Tensor, rotary: Rotary, kv: LayerKV, geom: Geometry) -> torch.Tensor:
    """qkv [T, (Hq + 2 Hk) D] → RoPE on q and k → k and v into the paged caches; returns q [T, Hq, D]
    (kernels/rope_kv.py, without its deferred scale)."""
    hq, hk, d = geom.num_heads, geom.num_kv_heads, geom.head_dim
    q = qkv[:, : hq * d].view(-1, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(-1, hk, d)
    v = qkv[:, (hq + hk) * d :].view(-1, hk, d)
    q, k = rope(q, k, rotary.positions, rotary.cos_sin)
    write_kv(k, v, kv.k_cache, kv.v_cache, kv.slot_mapping)
    return q


def _gather_context(cache: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached rows of one sequence: [length, Hk, D]."""
    bs = cache.shape[1]
    n_blocks = -(-length // bs)
    return cache[table[:n_blocks].long()].reshape(-1, *cache.shape[2:])[:length]


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: PagedBatch, scale: float
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context.

    q [T, Hq, D] → o [T, Hq, D]. Query j of a sequence with n new tokens and
    context length L sits at position L - n + j and sees keys 0..L-n+j. GQA:
    query head h reads kv head h // (Hq // Hk). Softmax in fp32.
    """
    out = torch.empty_like(q)
    hq, hk = q.shape[1], k_cache.shape[2]
    qs, lens = batch.host_layout
    if batch.is_decode_only and len(lens) > 1:
        return _decode_attention_batched(q, k_cache, v_cache, batch, scale)
    for i, length in enumerate(lens):
        a, b = qs[i], qs[i + 1]
        if b == a:
            continue
        n = b - a
        keys = _gather_context(k_cache, batch.block_tables[i], length).float().transpose(0, 1)  # [Hk, L, D]
        vals = _gather_context(v_cache, batch.block_tables[i], length).float().transpose(0, 1)
        qi = q[a:b].float().transpose(0, 1)  # [Hq, n, D]
        if n == 1 or n == length:  # decode sees every key; a whole prompt is plain causal: no mask tensor
            oi = F.scaled_dot_product_attention(
                qi, keys, vals, is_causal=n > 1, scale=scale, enable_gqa=hq != hk
            )
        else:
            at = torch.arange(length, device=q.device)
            mask = at[None, :] <= at[length - n :, None]  # [n, L]
            oi = F.scaled_dot_product_attention(
                qi, keys, vals, attn_mask=mask, scale=scale, enable_gqa=hq != hk
            )
        out[a:b] = oi.transpose(0, 1).to(q.dtype)
    return out


def _decode_attention_batched(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: PagedBatch, scale: float
) -> torch.Tensor:
    """All-decode step: pad every context to the longest and mask, one SDPA call for the batch."""
    bsz, hq, hk = q.shape[0], q.shape[1], k_cache.shape[2]
    bs = k_cache.shape[1]
    n_blocks = -(-batch.max_context_len // bs)
    table = batch.block_tables[:, :n_blocks].long().clamp_min(0)
    keys = k_cache[table].reshape(bsz, n_blocks * bs, hk, -1).float().transpose(1, 2)  # [B, Hk, L, D]
    vals = v_cache[table].reshape(bsz, n_blocks * bs, hk, -1).float().transpose(1, 2)
    mask = torch.arange(n_blocks * bs, device=q.device)[None, :] < batch.context_lens.long()[:, None]
    o = F.scaled_dot_product_attention(
        q.float()[:, :, None, :],
        keys,
        vals,
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=hq != hk,
    )
    return o[:, :, 0, :].to(q.dtype)


# -- LayerNorm (GPT-NeoX), deferred -----------------------------------------------------------------
#
# LayerNorm then linear, per row x (length K): z = W (γ ⊙ (x − μ)/σ + β) + b = (1/σ)(W' x − μ c) + b'
# with W' = W diag(γ), c = W' 1 and b' = W β + b folded at load (models/loader.py). The producer of x
# hands on (Σx, M2) with M2 = Σ(x − mean)² taken about the row's own mean: Σx² − K μ² would cancel
# catastrophically for rows whose mean is large next to their spread (fp32 keeps ~7 digits, so a
# mean of 1e3 and a spread of 1 leave nothing of the variance); the shifted sum does not.


def ln_stats(x: torch.Tensor) -> torch.Tensor:
    """A producer's LayerNorm statistics of the rows it wrote: [T, 2] fp32 = (Σx, Σ(x − mean)²)."""
    xf = x.float()
    total = xf.sum(-1, keepdim=True)
    m2 = (xf - total / x.shape[-1]).pow(2).sum(-1, keepdim=True)
    return torch.cat((total, m2), dim=-1)


def ln_scale(stats: torch.Tensor, k: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/σ) per row [T, 1] from packed statistics [T, 2P] (P partial Σx, then P Σ(x − tile
    mean)², tile t holding min(w, K − t·w) columns, w = next_pow2(⌈K/P⌉): the Triton producers'
    BLOCK_N). The tiles combine exactly: M2 = Σ M2_t + Σ (S_t − n_t μ)² / n_t."""
    p = stats.shape[1] // 2
    sums, m2 = stats[:, :p].double(), stats[:, p:].double()
    w = 1 << max(0, (-(-k // p)) - 1).bit_length()
    # on the device, no host tensor: this also runs inside CUDA-graph capture (Triton's large M)
    n = (k - torch.arange(p, device=stats.device, dtype=torch.float64) * w).clamp(max=w)
    mean = sums.sum(-1, keepdim=True) / k
    total = m2.sum(-1, keepdim=True) + ((sums - n * mean) ** 2 / n).sum(-1, keepdim=True)
    return mean.float(), torch.rsqrt(total / k + eps).float()


def layernorm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The explicit norm of the 'off' path, (x − μ)/σ: gain and bias live in the next layer."""
    mean, rstd = ln_scale(ln_stats(x), x.shape[-1], eps)
    return ((x.float() - mean) * rstd).to(x.dtype)


def ln_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    col_sums: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    eps: float = 1e-5,
    want_stats: bool = False,
    out_dtype: torch.dtype | None = None,
    gelu: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = [(x W'ᵀ − μ c)/σ] + b' + residual [→ GELU] in fp32, rounded once; (y, ln_stats(y) or None).
    With `stats` (the producer's) the LayerNorm is deferred; without, x is taken as it is."""
    acc = x.float() @ weight.float().t()
    return ln_epilogue(
        acc, x.shape[-1], col_sums, bias, residual, stats, eps, want_stats, out_dtype or x.dtype, gelu
    )


def ln_epilogue(
    acc: torch.Tensor,
    k: int,
    col_sums: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    stats: torch.Tensor | None,
    eps: float,
    want_stats: bool,
    out_dtype: torch.dtype,
    gelu: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The deferred LayerNorm's epilogue on an fp32 product x W'ᵀ of K-wide rows: mean correction and
    1/σ, bias, residual, GELU, one rounding to `out_dtype`; (y, ln_stats(y) or None)."""
    if stats is not None:
        mean, rstd = ln_scale(stats, k, eps)
        acc = (acc - mean * col_sums.float()[None, :]) * rstd
    if bias is not None:
        acc = acc + bias.float()
    if residual is not None:
        acc = acc + residual.float()
    if gelu is not None:
        acc = F.gelu(acc, approximate=gelu)
    y = acc.to(out_dtype)
    return y, (ln_stats(y) if want_stats else None)


def ln_embedding(
    ids: torch.Tensor, table: torch.Tensor, want_stats: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = F.embedding(ids, table)
    return x, (ln_stats(x) if want_stats else None)


def gelu_mlp_input(
    x: torch.Tensor,
    stats: torch.Tensor | None,
    w_up: torch.Tensor,
    c_up: torch.Tensor,
    b_up: torch.Tensor,
    eps: float,
    approximate: str = "none",
) -> torch.Tensor:
    """GELU(LayerNorm(x) W_upᵀ + b_up), the norm deferred when `stats` is given."""
    return ln_linear(x, w_up, c_up, b_up, stats=stats, eps=eps, gelu=approximate)[0]


def ln_attn_input(
    x: torch.Tensor,
    stats: torch.Tensor | None,
    w_qkv: torch.Tensor,
    c_qkv: torch.Tensor,
    b_qkv: torch.Tensor,
    rotary: Rotary,
    kv: LayerKV,
    geom: Geometry,
) -> torch.Tensor:
    """attn_input with the deferred LayerNorm: qkv GEMM → (partial) RoPE → KV write; returns q."""
    qkv, _ = ln_linear(x, w_qkv, c_qkv, b_qkv, stats=stats, eps=geom.eps)
    return rope_kv_write(qkv, rotary, kv, geom)
