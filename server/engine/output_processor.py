"""The engine's per-request state and the host work on each sampled token: detokenized text, stop
strings held back and cut, finish reasons, and the deltas (`RequestOutput`) the clients stream."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fusionserve.server.contract import RequestOutput, SamplingParams, TokenLogprob
from fusionserve.server.engine.sequence import Sequence, Status


class StopMatcher:
    """Cuts text at the first stop string, holding back any tail that may begin one.

    Text arrives in pieces that need not align with the stop strings, so a piece
    ending in a prefix of a stop string is held until the next piece decides. With `accept`
    (a constrained output), a stop string ends the output only where the whole text before it
    is accepted (a complete match of the grammar); other occurrences are ordinary text.
    """

    def __init__(self, stops: tuple[str, ...], accept: Callable[[str], bool] | None = None):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.accept = accept
        self.emitted = ""  # all text released so far (what `accept` judges, with the new part)

    def _first_stop(self, buf: str) -> int:
        """Index of the first stop string in buf that ends the output, or -1."""
        for i in sorted({i for s in self.stops for i in _find_all(buf, s)}):
            if self.accept is None or self.accept(self.emitted + buf[:i]):
                return i
        return -1

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        out, hit = self._feed(text, final)
        self.emitted += out
        return out, hit

    def _feed(self, text: str, final: bool) -> tuple[str, bool]:
        buf = self.held + text
        stop = self._first_stop(buf)
        if stop >= 0:
            self.held = ""
            return buf[:stop], True
        keep = 0
        if not final:
            for k in range(min(len(buf), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
                if any(s.startswith(buf[-k:]) for s in self.stops):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False


def _find_all(text: str, sub: str) -> Iterator[int]:
    i = text.find(sub)
    while i >= 0:
        yield i
        i = text.find(sub, i + 1)


@dataclass
class RequestState:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    priority: int = 0
    choices: list[Choice] = field(default_factory=list)
    prompt_lps: list[TokenLogprob | None] | None = None
    first_token_at: float | None = None
    num_finished: int = 0
    finish_reason: str | None = None


@dataclass(eq=False)
class Choice:
    """The engine's state for one sequence (one of a request's n choices)."""

    request: RequestState
    index: int
    seq: Sequence
    noise_seed: int | None  # a seeded choice's: its draws' Philox keys derive from it (sampler.py)
    detok: Any  # models.tokenizer.IncrementalDetokenizer | None
    stops: StopMatcher | None
    matcher: Any = None  # llguidance.LLMatcher of a constrained output (server/engine/structured.py)
    grammar_done: bool = False  # its grammar admits nothing more after the last collected id
    new_ids: list[int] = field(default_factory=list)
    new_lps: list[TokenLogprob] = field(default_factory=list)
    new_text: str = ""
    sent_prompt_lps: bool = False
    last_token_at: float | None = None
    # Launch-ahead: the row of the step in flight whose sampled id is this sequence's trailing
    # UNKNOWN_TOKEN; -1 when it has none.
    pending_row: int = -1
    stop_reason: str | None = None  # decided when the token arrived (eos / stop id / length)
    finish_reason: str | None = None  # set once its text is processed

    def seq_finished(self) -> bool:
        return self.seq.status is Status.FINISHED

    def push_text(self, tok: int) -> bool:
        """Detokenize a sampled id into `new_text` (stop strings cut); True when one was hit."""
        text = self.detok.push(tok) if self.detok is not None else ""
        hit = False
        if self.stops is not None:
            text, hit = self.stops.feed(text)
        self.new_text += text
        return hit

    def flush_text(self) -> None:
        """Release text held back for a partial character or a possible stop string."""
        tail = self.detok.flush() if self.detok is not None else ""
        if self.stops is not None:
            tail, _ = self.stops.feed(tail, final=True)
        self.new_text += tail

    def emit(self) -> RequestOutput:
        """The delta since the last one, and reset."""
        req = self.request
        prompt_lps = None
        if req.prompt_lps is not None and not self.sent_prompt_lps:
            prompt_lps, self.sent_prompt_lps = list(req.prompt_lps), True
        out = RequestOutput(
            request_id=req.request_id,
            index=self.index,
            text=self.new_text,
            token_ids=self.new_ids,
            logprobs=self.new_lps if req.params.logprobs is not None else None,
            prompt_logprobs=prompt_lps,
            finished=self.finish_reason is not None,
            finish_reason=self.finish_reason,
            prompt_tokens=self.seq.num_prompt,
            completion_tokens=self.seq.num_output,
        )
        self.new_ids, self.new_lps, self.new_text = [], [], ""
        return out


def abort_outputs(req: RequestState, done: set[int]) -> list[RequestOutput]:
    """The final 'abort' delta of every choice not finished yet."""
    by_index = {ch.index: ch for ch in req.choices}
    return [
        RequestOutput(
            req.request_id,
            index,
            "",
            [],
            [] if req.params.logprobs is not None else None,
            None,
            True,
            "abort",
            len(req.prompt_ids),
            by_index[index].seq.num_output if index in by_index else 0,
        )
        for index in range(req.params.n)
        if index not in done
    ]


def merge_output(merged: dict[tuple[str, int], RequestOutput], out: RequestOutput) -> None:
    """Fold a delta into the accumulated output of its choice."""
    key = (out.request_id, out.index)
    acc = merged.get(key)
    if acc is None:
        merged[key] = RequestOutput(
            **{
                **out.__dict__,
                "token_ids": list(out.token_ids),
                "logprobs": list(out.logprobs) if out.logprobs is not None else None,
            }
        )
        return
    acc.text += out.text
    acc.token_ids.extend(out.token_ids)
    if out.logprobs is not None and acc.logprobs is not None:
        acc.logprobs.extend(out.logprobs)
    acc.prompt_logprobs = acc.prompt_logprobs or out.prompt_logprobs
    acc.finished, acc.finish_reason = out.finished, out.finish_reason
    acc.completion_tokens = out.completion_tokens


def wants_prompt_rows(ch: Choice) -> bool:
    """The leader of a prompt_logprobs request whose prompt rows are not all scored yet."""
    req, seq = ch.request, ch.seq
    return (
        req.prompt_lps is not None
        and ch.index == 0
        and seq.num_computed < seq.num_prompt - 1
        and len(req.prompt_lps) < seq.num_prompt
    )


def add_prompt_logprobs(ch: Choice, logits: Any, start: int) -> None:
    """Rows at positions start.. predict prompt tokens start+1..; keep those not scored yet
    (a sequence recomputed after preemption scores its prompt again)."""
    from fusionserve.server.engine.sampler import prompt_logprobs

    lps: list = ch.request.prompt_lps
    skip = len(lps) - (start + 1)
    if skip < 0 or skip >= logits.shape[0]:
        return
    next_ids = ch.seq.tokens[len(lps) : start + 1 + logits.shape[0]]
    lps.extend(prompt_logprobs(logits[skip:], next_ids, ch.request.params.prompt_logprobs or 0))
