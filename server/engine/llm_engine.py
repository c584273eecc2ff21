"""The engine: a synchronous, token-id based core. `step()` runs one scheduler plan through the
model and turns the sampled ids into per-choice deltas (detokenized text with stop strings held
back and cut, finish reasons, logprobs). It needs no tokenizer unless a request uses stop strings.

What it measures goes into a plain `StepStats` record (`take_step_stats()`), never into a metrics
library: Prometheus lives in the HTTP process. `EngineCore` (core.py) drives this class in both
placements, a thread of the server or its own process; see docs/DESIGN.md, "One step".
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from fusionserve.kernels.batch import choice_noise_seed
from fusionserve.models.decoder import Decoder
from fusionserve.models.layer_timer import LayerTimer
from fusionserve.models.tokenizer import load_tokenizer
from fusionserve.server.contract import (
    EngineConfig,
    EngineLimits,
    EngineStats,
    FinishedRequest,
    RequestOutput,
    SamplingParams,
    StepStats,
)
from fusionserve.server.engine.block_manager import BlockManager
from fusionserve.server.engine.fusion import FusionControl, path_label
from fusionserve.server.engine.model_runner import ModelRunner, context_limit, kv_cache_blocks, load_decoder
from fusionserve.server.engine.output_processor import (
    Choice,
    RequestState,
    StopMatcher,
    abort_outputs,
    add_prompt_logprobs,
    merge_output,
    wants_prompt_rows,
)
from fusionserve.server.engine.sampler import SampleHandle, Sampler
from fusionserve.server.engine.scheduler import Scheduler, SchedulerConfig
from fusionserve.server.engine.sequence import UNKNOWN_TOKEN, Sequence, Status
from fusionserve.server.engine.structured import GrammarMatchers, ParkedRequests


@dataclass
class _InFlight:
    """A launched step whose sampled ids are not on the host yet."""

    rows: list[Choice]
    handle: SampleHandle | None
    fused: bool
    phase: str
    timer: LayerTimer | None
    t0: float
    # Launched ahead with rows whose sampling reads host ids (a grammar, penalties): the forward
    # pass is queued, the sampling waits for the previous step's collect (_sample_deferred).
    deferred: tuple | None = None


class LLMEngine:
    """Add requests by token ids, call `step()` until idle."""

    def __init__(self, config: EngineConfig, decoder: Decoder | None = None, tokenizer: object | None = None):
        self.config = config
        model_dir = Path(config.model_dir) if config.model_dir is not None else None
        if decoder is None:
            decoder, model_dir = load_decoder(config)
        self.decoder = decoder
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
        self.model_name = config.served_model_name or (model_dir.name if model_dir else "model")
        num_blocks = kv_cache_blocks(config, decoder)
        bs = config.block_size
        self.max_model_len, self.max_model_len_why = context_limit(
            config.max_model_len, decoder, num_blocks * bs
        )
        self.limits = EngineLimits(decoder.config.vocab_size, self.max_model_len, self.tokenizer is not None)
        self.runner = ModelRunner(decoder, num_blocks, bs)
        self.kernel_path = self.runner.prepare_kernels(config, self.max_model_len)
        self.blocks = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.scheduling_policy),
            self.blocks,
        )
        self.sampler = Sampler(decoder.device, config.seed)
        self.fusion = FusionControl(config.fusion)
        eos = getattr(self.tokenizer, "eos_token_ids", None) if self.tokenizer is not None else None
        self.eos_token_ids = frozenset(eos if eos is not None else decoder.config.eos_token_ids)
        self.requests: dict[str, RequestState] = {}
        self.choices: dict[int, Choice] = {}  # by seq_id, while the request lives
        self.num_steps = 0
        self._path_steps = {True: 0, False: 0}
        self._seq_ids = itertools.count()
        self._inflight: deque[_InFlight] = deque()  # launched, ids not read yet (at most two)
        self._last_collect = 0.0
        self._stats = StepStats()
        self._grammars: GrammarMatchers | None = None  # built on the first constrained request
        self._parked = ParkedRequests()  # waiting for their grammar to compile

    # -- requests --------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival: float | None = None,
        priority: int = 0,
    ) -> None:
        """Queue a request; `priority` (lower first) counts only under the priority policy."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        prompt_ids = [int(t) for t in prompt_ids]
        self.limits.check(prompt_ids, params)  # ValueError / RequestTooLongError
        req = RequestState(
            request_id, prompt_ids, params, time.monotonic() if arrival is None else arrival, priority
        )
        req.prompt_lps = [None] if params.prompt_logprobs is not None else None
        compiled = self.grammars.compile_async(params.grammar) if params.grammar is not None else None
        if compiled is not None and compiled.done():
            compiled.result()  # a grammar that does not compile fails its request here
        self.requests[request_id] = req
        if compiled is not None and not compiled.done():  # compiling on a worker thread: parked
            self._parked.add(compiled, req)
        else:
            self._schedule_leader(req)

    def _schedule_leader(self, req: RequestState) -> None:  # n > 1: the others fork off it
        leader = self._new_choice(req, 0, list(req.prompt_ids)).seq
        leader.pending_forks = req.params.n - 1
        self.scheduler.add(leader)

    @property
    def grammars(self) -> GrammarMatchers:
        if self._grammars is None:
            self._grammars = GrammarMatchers.for_model(self.tokenizer, self.decoder, self.eos_token_ids)
        return self._grammars

    def _unpark(self) -> list[RequestOutput]:
        """Schedule the requests whose grammar finished compiling (abort those that failed)."""
        idle = not (self.scheduler.has_work() or self._inflight)
        ready, failed = self._parked.take_done(self.requests, idle)
        for req in ready:
            self._schedule_leader(req)
        return [out for req in failed for out in self.abort_request(req.request_id)]

    def _new_choice(self, req: RequestState, index: int, tokens: list[int]) -> Choice:
        p = req.params
        detok = None
        if self.tokenizer is not None:
            from fusionserve.models.tokenizer import IncrementalDetokenizer

            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, p.skip_special_tokens)
        seq = Sequence(
            seq_id=next(self._seq_ids),
            tokens=tokens,
            num_prompt=len(req.prompt_ids),
            use_prefix_cache=p.prompt_logprobs is None,
            priority=req.priority,
            arrival=req.arrival,
        )
        matcher = self.grammars.matcher(p.grammar) if p.grammar is not None else None
        stops = None
        if p.stop:
            accept = (lambda text, g=p.grammar: self.grammars.accepts(g, text)) if p.grammar else None
            stops = StopMatcher(p.stop, accept)
        choice = Choice(req, index, seq, choice_noise_seed(p.seed, index), detok, stops, matcher)
        req.choices.append(choice)
        self.choices[seq.seq_id] = choice
        return choice

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        """Drop a request at once, freeing all its blocks; returns its final 'abort' outputs."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return []
        done = {ch.index for ch in req.choices if ch.seq.status is Status.FINISHED}
        for ch in req.choices:
            if ch.seq.status is not Status.FINISHED:
                self.scheduler.finish(ch.seq)
        self._forget(req)
        self._stats.aborts += 1
        self._observe_done(req, "abort")
        return abort_outputs(req, done)

    def _forget(self, req: RequestState) -> None:
        for ch in req.choices:
            self.choices.pop(ch.seq.seq_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._inflight)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_usage=self.blocks.usage,
            preemptions=self.scheduler.num_preemptions,
            prefix_hit_rate=self.blocks.prefix_hit_rate,
            steps=self.num_steps,
            num_blocks=self.blocks.num_blocks,
            free_blocks=self.blocks.num_free,
        )

    def take_step_stats(self) -> StepStats:
        """What was measured since the last call (the core sends it with the step's outputs)."""
        stats, self._stats = self._stats, StepStats()
        return stats

    # -- one step --------------------------------------------------------------------
    #
    # A step is launched (schedule, prepare, execute, sampling kernels), then collected: its
    # sampled ids reach the host (the one wait) and only what the next schedule needs is done at
    # once (append, eos / stop token ids / max_tokens, freeing blocks). The slower per-token work
    # (detokenization, stop strings, logprob formatting, outputs) comes after. With `overlap`
    # step n+1 is launched *before* step n is collected (launch-ahead): its decodes read their
    # input ids, sampled by step n, on the device, so the GPU goes from step to step without
    # waiting for the host's schedule/prepare; all the host work of step n runs while n+1
    # computes. A sequence that step n finishes (eos, stop token) may sit in step n+1: its blocks
    # are freed when n is collected (later steps run after n+1 on the stream) and the extra token
    # is dropped when n+1 is collected; one cut by a stop string is treated the same way.

    def step(self) -> list[RequestOutput]:
        parked = self._unpark() if self._parked else []
        if not self.config.overlap:
            self._launch()
            done = self._collect()
        else:  # one call still returns the outputs of one step (the first call launches two)
            if not self._inflight:
                self._launch()
            ahead = self._launch_ahead()
            done = self._collect()
            self._sample_deferred()
            if not ahead:
                self._launch()
        return parked + (self._process(*done) if done is not None else [])

    def _launch_ahead(self) -> bool:
        """Launch the next step while the one in flight still runs; False when it must wait for the ids.

        Each live row of the step in flight gets an UNKNOWN_TOKEN whose id the next step gathers
        on the device. If a row's sampling reads host ids (a grammar's state, penalties), the next
        step's sampling waits for this collect (`_InFlight.deferred`); its forward pass does not.
        A row that reaches max_tokens / max_model_len with this token is held back.
        """
        if len(self._inflight) != 1:
            return False
        inf = self._inflight[0]
        live = [(i, ch) for i, ch in enumerate(inf.rows) if ch.seq.status is Status.RUNNING]
        for i, ch in live:
            ch.pending_row = i
            ch.seq.tokens.append(UNKNOWN_TOKEN)
            if self._at_length_limit(ch):
                self.scheduler.held.add(ch.seq.seq_id)
        return self._launch(ahead_of=inf)

    def _launch(self, ahead_of: _InFlight | None = None) -> bool:
        """Schedule and queue one step on the device (model + sampling); no wait for its result.

        `ahead_of`: the step still in flight whose sampled ids this one's pending decodes read."""
        plan = self.scheduler.schedule()
        self._stats.preemptions += len(plan.preempted_ids)
        if not plan.seq_ids:
            return False
        fused = self.fusion.step_mode()
        # Count steps per path, so `ab` with an even interval still times both paths.
        every, self._path_steps[fused] = self.config.layer_timing_every, self._path_steps[fused] + 1
        timer = self.runner.make_timer() if every and (self._path_steps[fused] - 1) % every == 0 else None
        phase = "decode" if plan.is_decode else "prefill"
        t0 = time.perf_counter()
        planned = [self.choices[i] for i in plan.seq_ids]
        want_prompt = [wants_prompt_rows(ch) for ch in planned]
        # Plain greedy rows need no final-norm scale on the fused path (argmax is scale-invariant).
        scaled = not fused or any(want_prompt) or any(ch.request.params.needs_scaled_logits for ch in planned)
        pending_ids = pending_rows = None
        if ahead_of is not None and ahead_of.handle is not None:
            # Only a running decode holds an UNKNOWN_TOKEN (a preempted one is not admitted).
            pending_rows = [ch.pending_row for ch in planned]
            pending_ids = ahead_of.handle.chosen
        tokens, prompts = [ch.seq.tokens for ch in planned], [ch.seq.num_prompt for ch in planned]
        inputs = self.runner.prepare(plan, tokens, prompts, want_prompt, pending_ids, pending_rows)
        drawn = None
        if fused and self.config.flash_sampling:  # FlashSampling: plain rows drawn in the LM head
            n, vocab = inputs.logit_rows.numel(), self.decoder.config.vocab_size
            drawn = self.sampler.lm_head_draw(planned, inputs.sample_index, n, vocab)
        logits = self.runner.execute(inputs, fused, timer, scaled, drawn.draw if drawn else None)
        self.scheduler.advance(plan)
        rows, handle, deferred, rest, rest_index = [], None, None, planned, inputs.sample_index
        if drawn is not None:  # `logits` holds the drawn ids; the other rows' logits are the draw's
            rows, handle, logits = drawn.rows, drawn.handle(logits), drawn.draw.logits
            rest, rest_index = drawn.rest, drawn.rest_index
        if ahead_of is not None and any(ch.request.params.needs_host_ids for ch in rest):
            deferred = (rest, rest_index, logits, any(want_prompt))
        elif rest and any(i is not None for i in rest_index):
            more, handle_more = self._sample(rest, rest_index, logits, any(want_prompt))
            rows, handle = rows + more, SampleHandle.join(handle, handle_more)
        for ch, span, start in zip(planned, inputs.prompt_index, plan.num_computed):
            if span is not None:  # prompt logprobs (echo) wait for the device here: rare, prefill only
                add_prompt_logprobs(ch, logits[span[0] : span[0] + span[1]], start)
        self._inflight.append(_InFlight(rows, handle, fused, phase, timer, t0, deferred))
        return True

    def _sample_deferred(self) -> None:
        """Queue the sampling a launched-ahead step left for after the previous step's collect."""
        for inf in self._inflight:
            if inf.deferred is not None:  # after any rows the LM head drew (FlashSampling)
                more, handle = self._sample(*inf.deferred)
                inf.rows, inf.handle = inf.rows + more, SampleHandle.join(inf.handle, handle)
                inf.deferred = None

    def _sample(
        self, planned: list[Choice], sample_index: list[int | None], logits: torch.Tensor | None, shared: bool
    ) -> tuple[list[Choice], SampleHandle | None]:
        """Queue sampling for the rows that reached their end (and the forks of a finished prompt)."""
        rows: list[Choice] = []
        src: list[int] = []
        for ch, at in zip(planned, sample_index):
            if at is None:
                continue
            rows.append(ch)
            src.append(at)
            if ch.seq.pending_forks:
                for child in self._fork(ch):
                    rows.append(child)
                    src.append(at)
        if not rows:
            return rows, None
        # The sampler may change its input in place: index (copy) when prompt rows share it.
        whole = len(src) == logits.shape[0] and src[-1] == len(src) - 1 and not shared
        batch = logits if whole else logits[src]
        constrained = [
            i for i, ch in enumerate(rows) if ch.matcher is not None and ch.seq.status is not Status.FINISHED
        ]
        if constrained:  # the host fills the masks while the device still runs the forward pass
            self.grammars.apply(batch, [rows[i].matcher for i in constrained], constrained)
        handle = self.sampler.launch(
            batch,
            [ch.request.params for ch in rows],
            self.sampler.keys(rows),
            lambda i: (rows[i].seq.tokens, rows[i].seq.num_prompt),
        )
        return rows, handle

    def _collect(self) -> tuple[SampleHandle | None, list[tuple[Choice, int, int]]] | None:
        """Wait for the oldest launched step's ids; account what the next schedule needs."""
        if not self._inflight:
            return None
        inf = self._inflight.popleft()
        token_ids = inf.handle.token_ids() if inf.handle is not None else []
        if self._grammars is not None:
            self._grammars.consume(inf.rows, token_ids)
        # Launched ahead, a step queues behind the previous one: its latency starts when that one ended.
        end = time.perf_counter()
        self._observe_step(inf, end - max(inf.t0, self._last_collect))
        self._last_collect = end
        now = time.monotonic()
        done: list[tuple[Choice, int, int]] = []
        for i, (ch, tok) in enumerate(zip(inf.rows, token_ids)):
            seq = ch.seq
            if ch.pending_row >= 0:  # the UNKNOWN_TOKEN a step launched ahead has read on the device
                seq.tokens[-1] = tok
                ch.pending_row = -1
                self.scheduler.held.discard(seq.seq_id)
            elif seq.status is not Status.FINISHED:
                seq.tokens.append(tok)
            if seq.status is Status.FINISHED:  # aborted, or cut by a stop string while in flight
                continue
            self._account_token(ch, tok, now)
            done.append((ch, tok, i))
        self.num_steps += 1
        return inf.handle, done

    def _account_token(self, ch: Choice, tok: int, now: float) -> None:
        """Latency bookkeeping and the finish decisions the next schedule needs (blocks freed now)."""
        req, p = ch.request, ch.request.params
        ch.new_ids.append(tok)
        if req.first_token_at is None:
            self._stats.ttfts.append(now - req.arrival)
            req.first_token_at = now
        elif ch.last_token_at is not None:
            self._stats.itls.append(now - ch.last_token_at)
        ch.last_token_at = now
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_token_ids):
            ch.stop_reason = "stop"
        elif ch.grammar_done:
            ch.stop_reason = "complete"  # the grammar admits nothing more: its text ends the output
        elif self._at_length_limit(ch):
            ch.stop_reason = "length"
        if ch.stop_reason is not None:
            self.scheduler.finish(ch.seq)

    def _at_length_limit(self, ch: Choice) -> bool:
        """Its last token (unknown or real) reaches max_tokens or max_model_len."""
        seq = ch.seq
        return seq.num_output >= ch.request.params.max_tokens or seq.num_tokens >= self.max_model_len

    def _process(
        self, handle: SampleHandle | None, done: list[tuple[Choice, int, int]]
    ) -> list[RequestOutput]:
        """The per-token host work of a collected step: logprobs, text, stop strings, outputs."""
        lps = handle.logprobs() if handle is not None and done else None
        outputs = []
        for ch, tok, i in done:
            if lps is not None and lps[i] is not None:
                ch.new_lps.append(lps[i])
            reason, hit = ch.stop_reason, False
            if reason != "stop":  # an eos / stop token id adds no text
                hit = ch.push_text(tok)
                reason = "stop" if hit or reason == "complete" else reason
            if reason is not None and ch.finish_reason is None:
                self._finish(ch, reason, stopped_by_string=hit)
            outputs.append(ch.emit())
        return outputs

    def _finish(self, ch: Choice, reason: str, stopped_by_string: bool = False) -> None:
        if not stopped_by_string:
            ch.flush_text()
        ch.finish_reason = reason
        if ch.seq.status is not Status.FINISHED:  # a stop string: it may sit in the launched step
            self.scheduler.finish(ch.seq)
        req = ch.request
        req.num_finished += 1
        if ch.index == 0:
            req.finish_reason = reason
        if req.num_finished == req.params.n:
            self.requests.pop(req.request_id, None)
            self._forget(req)
            self._observe_done(req, req.finish_reason or reason)

    def _fork(self, leader: Choice) -> list[Choice]:
        """n>1: siblings share the leader's prompt blocks once its prompt is in the cache.

        A sibling that cannot get a block for its copy of the partly filled last
        block waits in the queue instead and recomputes (prefix cache permitting, cheaply).
        """
        seq, children = leader.seq, []
        for index in range(1, seq.pending_forks + 1):
            child = self._new_choice(leader.request, index, list(seq.tokens))
            partial = seq.num_computed % self.blocks.block_size != 0
            if self.blocks.num_free >= int(partial):
                child.seq.table, copy = self.blocks.fork(seq.table, seq.num_computed)
                if copy is not None:
                    self.runner.copy_block(*copy)
                child.seq.num_computed = seq.num_computed
                self.scheduler.add_running(child.seq)
                children.append(child)
            else:
                self.scheduler.add(child.seq)
        seq.pending_forks = 0
        return children

    # -- measurements ----------------------------------------------------------------

    def _observe_step(self, inf: _InFlight, seconds: float) -> None:
        label = path_label(inf.fused)
        # A timed step runs eagerly; where other decode steps replay CUDA graphs it would skew
        # the step latency of its path, so it reports only its per-layer times.
        if inf.timer is None or self.runner.graphs is None:
            self._stats.steps.append((inf.phase, label, seconds))
        if inf.timer is not None:
            for layer, part, secs in inf.timer.results():
                self._stats.layers.append((inf.phase, label, layer, part, secs))

    def _observe_done(self, req: RequestState, reason: str) -> None:
        completion = sum(ch.seq.num_output for ch in req.choices)
        seconds = time.monotonic() - req.arrival
        self._stats.finished.append(FinishedRequest(reason, seconds, len(req.prompt_ids), completion))

    # -- convenience -----------------------------------------------------------------

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[list[RequestOutput]]:
        """Run requests to completion; per request, per choice, one merged output (tests, benchmarks)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{next(self._seq_ids)}" for _ in prompts]
        merged: dict[tuple[str, int], RequestOutput] = {}
        for rid, prompt, p in zip(ids, prompts, plist):
            self.add_request(rid, prompt, p)
        while self.has_unfinished():
            for out in self.step():
                merge_output(merged, out)
        return [[merged[(rid, i)] for i in range(p.n)] for rid, p in zip(ids, plist)]
