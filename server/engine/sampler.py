"""Next-token choice for a whole batch on the logits' device, each row with its own parameters.

Why Gumbel-max: `argmax(z/T + G)` with G ~ Gumbel(0, 1) draws exactly from
softmax(z/T) without computing the softmax denominator (docs/DESIGN.md, "The deferred-norm contract"),
and top-k / min-p filters are plain comparisons on z/T. Only top-p needs
probabilities, and only logprobs need a log-softmax; both run only for the
rows that ask.

The noise is a pure function of a per-row Philox key and the token id (kernels/sampling.py), so the
LM head can draw plain rows itself (FlashSampling: `lm_head_draw`) and draw exactly what this sampler
would from the written logits. A seeded choice's key comes from (its seed, its index, the position
drawn) alone: a seed gives the same text whatever else shares the batch, with fusion on or off,
with or without launch-ahead; unseeded rows take fresh keys from the engine's generator.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fusionserve.kernels.backend import draw_tokens
from fusionserve.kernels.batch import Draw, mix64
from fusionserve.server.contract import SamplingParams, TokenLogprob


def _draw_temperature(p: SamplingParams) -> float:
    """A row's T in a Draw: 0 for greedy (argmax, no noise)."""
    return 0.0 if p.greedy else p.temperature


@dataclass(frozen=True)
class RowDraw:
    """A step's FlashSampling plan: the plain rows (choices) the LM head draws, at which logit rows,
    and the Draw over all logit rows; the other sampled choices (`rest`, with their sample indices)
    take the sampler's path from the logits `draw.logits` holds for them (None: there are none)."""

    rows: list[Any]
    at: list[int]
    draw: Draw
    rest: list[Any]
    rest_index: list[int | None]

    def handle(self, ids: torch.Tensor) -> SampleHandle:
        """The drawn rows' ids out of the LM head's [logit rows] ids."""
        if len(self.at) == ids.shape[0]:
            return SampleHandle(ids, len(self.rows))
        # pinned: a pageable host-to-device copy could wait for the step still in flight (launch-ahead)
        at = torch.tensor(self.at, dtype=torch.long, pin_memory=ids.is_cuda).to(ids.device, non_blocking=True)
        return SampleHandle(ids[at], len(self.rows))


def _logprob_tensors(logits: torch.Tensor, chosen: torch.Tensor, kmax: int):
    """Device part: chosen-token logprob and top-kmax (values, ids) from one log-softmax."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = lp.gather(1, chosen.view(-1, 1)).view(-1)
    top_v, top_i = lp.topk(kmax, dim=-1) if kmax else (None, None)
    return chosen, chosen_lp, top_v, top_i


def _format_logprobs(parts, ks: list[int]) -> list[TokenLogprob]:
    """Host part: TokenLogprob entries from (chosen, chosen_lp, top_v, top_i)."""
    chosen, chosen_lp, top_v, top_i = (t.tolist() if t is not None else None for t in parts)
    out = []
    for r, k in enumerate(ks):
        # A grammar's mask leaves -inf where a token is not allowed: not a logprob to report.
        top = [(i, v) for i, v in zip(top_i[r][:k], top_v[r][:k]) if v != float("-inf")] if k else []
        out.append(TokenLogprob(int(chosen[r]), float(chosen_lp[r]), top))
    return out


def _logprob_entries(logits: torch.Tensor, chosen: torch.Tensor, ks: list[int]) -> list[TokenLogprob]:
    """Chosen-token logprob plus top-k for each row, from one log-softmax."""
    return _format_logprobs(_logprob_tensors(logits, chosen, max(ks) if ks else 0), ks)


class SampleHandle:
    """A batch's sampled ids (and logprobs), queued on the device; `token_ids()` is the one wait.

    On CUDA the ids are copied into pinned host memory without blocking as soon as they are
    queued, so `token_ids()` waits only for this step; logprob tensors come back in the same wait
    and are formatted later on the host (`logprobs()`), without touching the device again.
    """

    def __init__(self, chosen: torch.Tensor, n: int):
        self.n = n
        self.chosen = chosen
        self._lp: tuple | None = None
        self._lp_rows: list[int] = []
        self._ks: list[int] = []
        self._host: torch.Tensor | None = None
        self._event = None
        if chosen.is_cuda:
            self._host = torch.empty(chosen.shape, dtype=chosen.dtype, pin_memory=True)
            self._host.copy_(chosen, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def add_logprobs(self, raw: torch.Tensor, rows: list[int], ks: list[int]) -> None:
        self._lp_rows, self._ks = rows, ks
        self._lp = _logprob_tensors(raw, self.chosen[rows], max(ks) if ks else 0)
        if self._host is not None:  # ids and logprobs travel together
            self._lp = tuple(t.to("cpu", non_blocking=True) if t is not None else None for t in self._lp)
            self._event.record()

    @staticmethod
    def join(first: SampleHandle | None, second: SampleHandle | None) -> SampleHandle | None:
        """One handle for rows [first's..., second's...] (a mixed step: the LM head's drawn rows, then
        the sampler's, which alone may carry logprobs)."""
        if first is None or second is None:
            return second if first is None else first
        assert first._lp is None, "drawn rows carry no logprobs"
        joined = SampleHandle(torch.cat([first.chosen, second.chosen]), first.n + second.n)
        joined._lp, joined._ks = second._lp, second._ks
        joined._lp_rows = [first.n + r for r in second._lp_rows]
        return joined

    def token_ids(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()
            return self._host.tolist()
        return self.chosen.tolist()

    def logprobs(self) -> list[TokenLogprob | None]:
        lps: list[TokenLogprob | None] = [None] * self.n
        if self._lp is not None:
            if self._event is not None:
                self._event.synchronize()
            for i, e in zip(self._lp_rows, _format_logprobs(self._lp, self._ks)):
                lps[i] = e
        return lps


def prompt_logprobs(logits: torch.Tensor, next_ids: list[int], k: int) -> list[TokenLogprob]:
    """Logprob of each actual next prompt token under the logits of the position before it."""
    chosen = torch.tensor(next_ids, dtype=torch.long, device=logits.device)
    return _logprob_entries(logits, chosen, [k] * len(next_ids))


class Sampler:
    def __init__(self, device: torch.device | str = "cpu", seed: int | None = None):
        self.device = torch.device(device)
        self._rng = random.Random(seed)  # None: seeded from the OS

    def key(self, params: SamplingParams, noise_seed: int | None, position: int) -> int:
        """The Philox key of one draw: a seeded choice's from (noise seed, position) alone, a fresh one
        otherwise; greedy rows draw no noise (0)."""
        if params.greedy:
            return 0
        return mix64(noise_seed, position) if noise_seed is not None else self._rng.getrandbits(63)

    def keys(self, rows: Sequence[Any]) -> list[int]:
        """Keys of engine choices (`.request.params`, `.noise_seed`, `.seq.num_tokens`: the position of
        the token drawn, the same with or without a launch-ahead placeholder)."""
        return [self.key(ch.request.params, ch.noise_seed, ch.seq.num_tokens) for ch in rows]

    def _draw(self, params: Sequence[SamplingParams], keys: list[int]) -> Draw:
        temps = [_draw_temperature(p) for p in params]
        return Draw(self._to_device(temps, torch.float32), self._to_device(keys, torch.int64), any(temps))

    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.tensor(values, dtype=dtype)
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(self.device, non_blocking=True)

    def lm_head_draw(
        self, planned: Sequence[Any], sample_index: Sequence[int | None], num_rows: int, vocab: int
    ) -> RowDraw | None:
        """FlashSampling for a step with `num_rows` logit rows: its plain sampled rows (greedy or
        temperature only, no grammar, no fork to seed) are drawn by the LM head; every other logit row
        (other sampled rows, prompt-logprob positions) is flagged T = -1 and gets its logits written in
        the same pass for the sampler. None when no row is plain (the step keeps the logits path)."""
        rows, at, rest, rest_index = [], [], [], []
        for ch, i in zip(planned, sample_index):
            if i is None:
                continue
            plain = ch.request.params.lm_head_draws and ch.matcher is None and not ch.seq.pending_forks
            (rows if plain else rest).append(ch)
            (at if plain else rest_index).append(i)
        if not rows:
            return None
        temps, keys = [-1.0] * num_rows, [0] * num_rows
        for ch, i, key in zip(rows, at, self.keys(rows)):
            temps[i], keys[i] = _draw_temperature(ch.request.params), key
        logits = None
        if len(rows) < num_rows:
            logits = torch.empty((num_rows, vocab), device=self.device, dtype=torch.float32)
        draw = Draw(
            self._to_device(temps, torch.float32),
            self._to_device(keys, torch.int64),
            any(t > 0 for t in temps),
            logits,
        )
        return RowDraw(rows, at, draw, rest, rest_index)

    def launch(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        keys: list[int],
        history: Callable[[int], tuple[list[int], int]] | None = None,
    ) -> SampleHandle:
        """Queue the sampling of a batch on the logits' device without waiting for it.

        Row i has `params[i]`, Philox key `keys[i]` (`key`) and, asked only for rows with penalties,
        `history(i)` = (prompt + generated tokens, prompt length). Plain greedy rows cost one
        batched argmax; only the rows that need them get penalties, bias, sorting (top-k/top-p)
        or a log-softmax; the draw itself is one pass over the batch (backend.draw_tokens).
        """
        rand_rows: list[int] = []
        special: list[int] = []  # penalties, logit bias or logprobs
        for i, p in enumerate(params):
            if not p.greedy:
                rand_rows.append(i)
            if (
                p.logprobs is not None
                or p.logit_bias
                or p.repetition_penalty != 1.0
                or p.presence_penalty
                or p.frequency_penalty
            ):
                special.append(i)
        logits = logits.float()
        if not rand_rows and not special:
            return SampleHandle(logits.argmax(dim=-1), len(params))
        if special and logits.is_inference():  # penalties and bias change rows in place
            logits = logits.clone()
        want_lp = [i for i in special if params[i].logprobs is not None]
        raw = logits[want_lp].clone() if want_lp else None  # logprobs report the model's distribution
        for i in special:
            p = params[i]
            if p.has_penalties:
                tokens, num_prompt = history(i) if history is not None else ([], 0)
                self._penalize(logits[i], p, tokens, num_prompt)
            if p.logit_bias:
                self._bias(logits[i], p)

        if rand_rows:
            chosen = self._sample_random(logits, params, keys)
        else:
            chosen = logits.argmax(dim=-1)
        handle = SampleHandle(chosen, len(params))
        if want_lp:
            handle.add_logprobs(raw, want_lp, [params[i].logprobs or 0 for i in want_lp])
        return handle

    @staticmethod
    def _penalize(row: torch.Tensor, p: SamplingParams, tokens: list[int], num_prompt: int) -> None:
        vocab = row.shape[0]
        if p.repetition_penalty != 1.0:  # HF/vLLM: over prompt and output tokens
            seen = torch.tensor(sorted(set(tokens)), dtype=torch.long, device=row.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and len(tokens) > num_prompt:
            out = torch.tensor(tokens[num_prompt:], dtype=torch.long, device=row.device)
            counts = torch.bincount(out, minlength=vocab)[:vocab].float()
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()

    @staticmethod
    def _bias(row: torch.Tensor, p: SamplingParams) -> None:
        ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=row.device)
        vals = torch.tensor([b for _, b in p.logit_bias], dtype=row.dtype, device=row.device)
        row.index_add_(0, ids, vals)

    def _sample_random(
        self, logits: torch.Tensor, params: list[SamplingParams], keys: list[int]
    ) -> torch.Tensor:
        """Greedy rows argmax, the others Gumbel-max at their temperature; rows with top-k / top-p /
        min-p first have z / T filtered and then draw at T = 1 (the same draw: (z / T) / 1)."""
        dev = logits.device
        filt = [
            i for i, p in enumerate(params) if not p.greedy and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0)
        ]
        draw = self._draw(params, keys)
        if not filt:
            return draw_tokens(logits, draw)
        temps = torch.tensor([params[i].temperature for i in filt], device=dev).view(-1, 1)
        z = logits[filt] / temps
        # Only rows with top-k / top-p are sorted (a sort of the full vocabulary is the costly part).
        sort = [j for j, i in enumerate(filt) if params[i].top_k > 0 or params[i].top_p < 1.0]
        if sort:
            sub = self._filter_sorted(
                z[sort], [params[filt[j]].top_k for j in sort], [params[filt[j]].top_p for j in sort]
            )
            if len(sort) == len(filt):
                z = sub
            else:
                z[sort] = sub
        min_p = [params[i].min_p for i in filt]
        if any(min_p):  # p_i >= min_p * p_max  <=>  z_i >= z_max + log(min_p): no softmax
            logmin = torch.tensor([math.log(m) if m > 0 else -math.inf for m in min_p], device=dev)
            z = z.masked_fill(z < z.max(dim=-1, keepdim=True).values + logmin.view(-1, 1), -math.inf)
        logits = logits.clone() if logits.is_inference() else logits
        logits[filt] = z
        draw.temps[filt] = 1.0
        return draw_tokens(logits, draw)

    @staticmethod
    def _filter_sorted(z: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
        vocab = z.shape[1]
        sorted_z, order = z.sort(dim=-1, descending=True)
        keep = torch.ones_like(sorted_z, dtype=torch.bool)
        ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=z.device)
        keep &= torch.arange(vocab, device=z.device).view(1, -1) < ks.view(-1, 1)
        ps = torch.tensor(top_p, device=z.device, dtype=torch.float32).view(-1, 1)
        if any(p < 1.0 for p in top_p):  # the only place a softmax is needed
            probs = torch.softmax(sorted_z.masked_fill(~keep, -math.inf), dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
            keep &= (before < ps) | (ps >= 1.0)
        keep[:, 0] = True
        masked = sorted_z.masked_fill(~keep, -math.inf)
        return torch.empty_like(z).scatter_(1, order, masked)
