"""Next-token choice for a whole batch on the logits' device, each row with its own parameters.

Why Gumbel-max: `argmax(z/T + G)` with G ~ Gumbel(0, 1) draws exactly from
softmax(z/T) without computing the softmax denominator (docs/DESIGN.md, "The deferred-norm contract"),
and top-k / min-p filters are plain comparisons on z/T. Only top-p needs
probabilities, and only logprobs need a log-softmax; both run only for the
rows that ask. Seeded rows draw their noise from their own torch.Generator, so
a seed gives the same text whatever else shares the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fusionserve.server.contract import GREEDY_EPS, SamplingParams, TokenLogprob


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
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def make_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def launch(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        history: Callable[[int], tuple[list[int], int]] | None = None,
    ) -> SampleHandle:
        """Queue the sampling of a batch on the logits' device without waiting for it.

        Row i has `params[i]`, `generators[i]` and, asked only for rows with penalties,
        `history(i)` = (prompt + generated tokens, prompt length). Plain greedy rows cost one
        batched argmax; only the rows that need them get penalties, bias, sorting (top-k/top-p),
        their own generator's noise, or a log-softmax.
        """
        rand_rows: list[int] = []
        special: list[int] = []  # penalties, logit bias or logprobs
        for i, p in enumerate(params):
            if p.temperature >= GREEDY_EPS and p.top_k != 1:
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

        chosen = logits.argmax(dim=-1)
        if rand_rows:
            chosen[rand_rows] = self._sample_random(
                logits[rand_rows], [params[i] for i in rand_rows], [generators[i] for i in rand_rows]
            )
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
        self, z: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        """Temperature, top-k, min-p, top-p, then Gumbel-max, for rows that are not greedy."""
        dev = z.device
        temps = torch.tensor([p.temperature for p in params], device=dev).view(-1, 1)
        z = z / temps
        # Only rows with top-k / top-p are sorted (a sort of the full vocabulary is the costly part).
        filt = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
        if filt:
            sub = self._filter_sorted(
                z[filt], [params[i].top_k for i in filt], [params[i].top_p for i in filt]
            )
            if len(filt) == len(params):
                z = sub
            else:
                z[filt] = sub
        min_p = [p.min_p for p in params]
        if any(min_p):  # p_i >= min_p * p_max  <=>  z_i >= z_max + log(min_p): no softmax
            logmin = torch.tensor([math.log(m) if m > 0 else -math.inf for m in min_p], device=dev)
            z = z.masked_fill(z < z.max(dim=-1, keepdim=True).values + logmin.view(-1, 1), -math.inf)
        return (z + self._gumbel(z.shape, generators)).argmax(dim=-1)

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

    def _gumbel(self, shape: torch.Size, generators: list[torch.Generator | None]) -> torch.Tensor:
        u = torch.empty(shape, device=self.device)
        shared = [i for i, g in enumerate(generators) if g is None]
        if len(shared) == len(generators):
            u = torch.rand(shape, generator=self.generator, device=self.device)
        elif shared:
            u[shared] = torch.rand((len(shared), shape[1]), generator=self.generator, device=self.device)
        for i, g in enumerate(generators):
            if g is not None:
                u[i] = torch.rand(shape[1], generator=g, device=self.device)
        return -torch.log(-torch.log(u))
