"""Next-token choice for a whole batch on the logits' device, each row with its own parameters.

Why Gumbel-max: `argmax(z/T + G)` with G ~ Gumbel(0, 1) draws exactly from
softmax(z/T) without computing the softmax denominator (DESIGN.md section 2),
and top-k / min-p filters are plain comparisons on z/T. Only top-p needs
probabilities, and only logprobs need a log-softmax; both run only for the
rows that ask. Seeded rows draw their noise from their own torch.Generator, so
a seed gives the same text whatever else shares the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

GREEDY_EPS = 1e-5  # temperatures below this are greedy


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 → disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: chosen token's logprob + top-k
    prompt_logprobs: int | None = None  # for completions echo+logprobs
    n: int = 1
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def needs_scaled_logits(self) -> bool:
        """False when the row's answer is an argmax of unmodified logits (scale-invariant)."""
        return not self.greedy or self.has_penalties or bool(self.logit_bias) or self.logprobs is not None

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError for parameters no sampler could honour (the HTTP layer checks first)."""
        checks = [
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k must be -1, 0 or positive"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty), "repetition_penalty must be > 0"),
            (math.isfinite(self.presence_penalty) and math.isfinite(self.frequency_penalty), "penalties must be finite"),
            (self.n >= 1, "n must be >= 1"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs must be >= 0"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs must be >= 0"),
            (all(math.isfinite(b) for _, b in self.logit_bias), "logit_bias values must be finite"),
        ]  # fmt: skip
        if vocab_size is not None:
            checks.append(
                (all(0 <= t < vocab_size for t, _ in self.logit_bias), "logit_bias token id out of range")
            )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # top-k (id, logprob), best first


@dataclass
class SampleRow:
    """What the sampler needs to know about one row of the batch."""

    params: SamplingParams
    tokens: list[int]  # prompt + generated so far (penalties)
    num_prompt: int
    generator: torch.Generator | None  # None → the sampler's shared generator


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
        top = list(zip(top_i[r][:k], top_v[r][:k])) if k else []
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

    @staticmethod
    def can_skip_scale(rows: list[SampleRow]) -> bool:
        """True when every row is a plain argmax, so the LM head may skip its final-norm scale."""
        return all(not r.params.needs_scaled_logits for r in rows)

    def sample(
        self, logits: torch.Tensor, rows: list[SampleRow]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """One token per row (and its logprobs when asked); `logits` [B, V] may be modified in place."""
        return self.sample_batch(
            logits,
            [r.params for r in rows],
            [r.generator for r in rows],
            lambda i: (rows[i].tokens, rows[i].num_prompt),
        )

    def sample_batch(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        history: Callable[[int], tuple[list[int], int]] | None = None,
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """`sample` without per-row objects (see `launch`), waiting for the result."""
        handle = self.launch(logits, params, generators, history)
        ids = handle.token_ids()
        return ids, handle.logprobs()

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
