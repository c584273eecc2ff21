"""What a request asks of sampling, and what it gets back: torch-free, so the HTTP process can
build and check them without importing the engine's compute side."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
