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


def _logprob_entries(logits: torch.Tensor, chosen: torch.Tensor, ks: list[int]) -> list[TokenLogprob]:
    """Chosen-token logprob plus top-k for each row, from one log-softmax."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = lp.gather(1, chosen.view(-1, 1)).view(-1).tolist()
    kmax = max(ks) if ks else 0
    top_v, top_i = lp.topk(kmax, dim=-1) if kmax else (None, None)
    out = []
    for r, k in enumerate(ks):
        top = list(zip(top_i[r, :k].tolist(), top_v[r, :k].tolist())) if k else []
        out.append(TokenLogprob(int(chosen[r]), float(chosen_lp[r]), top))
    return out


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
        logits = logits.float()
        want_lp = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw = logits[want_lp].clone() if want_lp else None  # logprobs report the model's distribution
        self._apply_penalties(logits, rows)
        self._apply_bias(logits, rows)

        chosen = logits.argmax(dim=-1)
        rand_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if rand_rows:
            chosen[rand_rows] = self._sample_random(logits[rand_rows], [rows[i] for i in rand_rows])
        ids = chosen.tolist()

        lps: list[TokenLogprob | None] = [None] * len(rows)
        if want_lp:
            entries = _logprob_entries(raw, chosen[want_lp], [rows[i].params.logprobs or 0 for i in want_lp])
            for i, e in zip(want_lp, entries):
                lps[i] = e
        return ids, lps

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SampleRow]) -> None:
        vocab = logits.shape[1]
        for i, r in enumerate(rows):
            p = r.params
            if not p.has_penalties:
                continue
            row = logits[i]
            if p.repetition_penalty != 1.0:  # HF/vLLM: over prompt and output tokens
                seen = torch.tensor(sorted(set(r.tokens)), dtype=torch.long, device=logits.device)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and len(r.tokens) > r.num_prompt:
                out = torch.tensor(r.tokens[r.num_prompt :], dtype=torch.long, device=logits.device)
                counts = torch.bincount(out, minlength=vocab)[:vocab].float()
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()

    @staticmethod
    def _apply_bias(logits: torch.Tensor, rows: list[SampleRow]) -> None:
        for i, r in enumerate(rows):
            if r.params.logit_bias:
                ids = torch.tensor(
                    [t for t, _ in r.params.logit_bias], dtype=torch.long, device=logits.device
                )
                vals = torch.tensor(
                    [b for _, b in r.params.logit_bias], dtype=logits.dtype, device=logits.device
                )
                logits[i].index_add_(0, ids, vals)

    def _sample_random(self, z: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """Temperature, top-k, min-p, top-p, then Gumbel-max, for rows that are not greedy."""
        dev = z.device
        temps = torch.tensor([r.params.temperature for r in rows], device=dev).view(-1, 1)
        z = z / temps
        top_k = [r.params.top_k if r.params.top_k > 0 else 0 for r in rows]
        top_p = [r.params.top_p for r in rows]
        if any(top_k) or any(p < 1.0 for p in top_p):
            z = self._filter_sorted(z, top_k, top_p)
        min_p = [r.params.min_p for r in rows]
        if any(min_p):  # p_i >= min_p * p_max  <=>  z_i >= z_max + log(min_p): no softmax
            logmin = torch.tensor([math.log(m) if m > 0 else -math.inf for m in min_p], device=dev)
            z = z.masked_fill(z < z.max(dim=-1, keepdim=True).values + logmin.view(-1, 1), -math.inf)
        return (z + self._gumbel(z.shape, rows)).argmax(dim=-1)

    @staticmethod
    def _filter_sorted(z: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
        vocab = z.shape[1]
        sorted_z, order = z.sort(dim=-1, descending=True)
        keep = torch.ones_like(sorted_z, dtype=torch.bool)
        ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=z.device)
        keep &= torch.arange(vocab, device=z.device).view(1, -1) < ks.view(-1, 1)
        ps = torch.tensor(top_p, device=z.device, dtype=torch.float32).view(-1, 1)
        if bool((ps < 1.0).any()):  # the only place a softmax is needed
            probs = torch.softmax(sorted_z.masked_fill(~keep, -math.inf), dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
            keep &= (before < ps) | (ps >= 1.0)
        keep[:, 0] = True
        masked = sorted_z.masked_fill(~keep, -math.inf)
        return torch.empty_like(z).scatter_(1, order, masked)

    def _gumbel(self, shape: torch.Size, rows: list[SampleRow]) -> torch.Tensor:
        u = torch.empty(shape, device=self.device)
        shared = [i for i, r in enumerate(rows) if r.generator is None]
        if shared:
            u[shared] = torch.rand((len(shared), shape[1]), generator=self.generator, device=self.device)
        for i, r in enumerate(rows):
            if r.generator is not None:
                u[i] = torch.rand(shape[1], generator=r.generator, device=self.device)
        return -torch.log(-torch.log(u))
