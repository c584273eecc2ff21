"""The engine's per-request state and the host work on each sampled token: detokenized text, stop
strings held back and cut, finish reasons, and the deltas (`RequestOutput`) the clients stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fusionserve.server.contract import RequestOutput, SamplingParams, TokenLogprob
from fusionserve.server.engine.sequence import Sequence


class StopMatcher:
    """Cuts text at the first stop string, holding back any tail that may begin one.

    Text arrives in pieces that need not align with the stop strings, so a piece
    ending in a prefix of a stop string is held until the next piece decides.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        if not final:
            for k in range(min(len(buf), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
                if any(s.startswith(buf[-k:]) for s in self.stops):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False


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
    generator: Any  # torch.Generator | None: a seeded request's own noise
    detok: Any  # models.tokenizer.IncrementalDetokenizer | None
    stops: StopMatcher | None
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
