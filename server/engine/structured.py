"""Constrained decoding in the engine: one llguidance matcher per constrained sequence, compiled
grammars cached by their text, and the step's token bitmask applied on the device before sampling.

Why llguidance (docs/DESIGN.md, "Structured output"): it has no Python dependencies (xgrammar
needs transformers, which the server keeps out of its run time), reads our tokenizer.json directly,
computes a row's mask in tens of microseconds by walking the token trie against an Earley parser,
and is the engine behind vLLM's and llama.cpp's guided decoding. The HTTP side builds and validates
the grammar text (server/api/structured_output.py); the engine only compiles and runs it.

Per step: the masks of the constrained rows are filled on the host (one pinned int32 row each,
threads inside llguidance) while the device runs the step's forward pass; one copy and one kernel
(kernels/token_bitmask.py) apply them, outside any CUDA graph. A step with no constrained row does
none of it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("fusionserve.engine")


class GrammarMatchers:
    """Compiled grammars (LRU by text) and the bitmask work of a step."""

    def __init__(
        self,
        tokenizer_json: Path,
        model_vocab: int,
        tokenizer_vocab: int,
        eos_ids: frozenset[int],
        cache_size: int = 512,
    ) -> None:
        import llguidance

        self._ll = llguidance
        self.tokenizer = llguidance.LLTokenizer(
            str(tokenizer_json), n_vocab=tokenizer_vocab, eos_token=sorted(eos_ids) or None
        )
        self.executor = llguidance.LLExecutor()
        # Masks cover the tokenizer's ids only: the kernel masks every column past them (a model's
        # padded embedding rows), and llguidance need not walk ids that spell nothing.
        self.words = (tokenizer_vocab + 31) // 32
        valid = np.zeros(self.words * 32, dtype=bool)
        valid[: min(tokenizer_vocab, model_vocab)] = True  # ids the model cannot produce stay masked
        self._valid_words = np.packbits(valid, bitorder="little").view(np.int32)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._compiling: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fusionserve-grammar")
        # Host and device mask buffers, grown on demand and reused: allocating pinned memory costs
        # about a millisecond, every step. Reuse is safe: the next fill follows a collect, which
        # waits for this step's sampling, which follows this step's copy on the stream.
        self._masks = torch.empty((0, self.words), dtype=torch.int32)
        self._rows = torch.empty(0, dtype=torch.int32)
        self._dev: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- compiling -----------------------------------------------------------------------

    def _compile(self, grammar: str) -> Any:
        matcher = self._ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid grammar: {matcher.get_error()}")
        with self._lock:
            self._cache[grammar] = matcher
            self._cache.move_to_end(grammar)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            self._compiling.pop(grammar, None)
        return matcher

    def compile_async(self, grammar: str) -> Future:
        """The compiled grammar (a pristine matcher), compiled on a worker thread if not cached:
        llguidance drops the GIL while it compiles, so the engine loop keeps stepping."""
        with self._lock:
            if grammar in self._cache:
                self._cache.move_to_end(grammar)
                done: Future = Future()
                done.set_result(self._cache[grammar])
                return done
            pending = self._compiling.get(grammar)
            if pending is None:
                pending = self._compiling[grammar] = self._pool.submit(self._compile, grammar)
            return pending

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher for one sequence (a copy of the cached, unused one)."""
        with self._lock:
            pristine = self._cache.get(grammar)
        if pristine is None:
            pristine = self.compile_async(grammar).result()
        return pristine.deep_copy()

    def accepts(self, grammar: str, text: str) -> bool:
        """Whether `text` is a complete match (a stop string may end a constrained output only
        where the text before it is one)."""
        m = self.matcher(grammar)
        return m.consume_tokens(self.tokenizer.tokenize_str(text)) and m.is_accepting()

    # -- one step ------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor, matchers: list[Any], rows: list[int]) -> None:
        """Mask logits[rows[i]] to what matchers[i] allows next (in place, one kernel on CUDA)."""
        from fusionserve.kernels import reference

        n, cuda = len(rows), logits.is_cuda
        if self._masks.shape[0] < n:
            cap = max(n, 2 * self._masks.shape[0])
            self._masks = torch.empty((cap, self.words), dtype=torch.int32, pin_memory=cuda)
            self._rows = torch.empty(cap, dtype=torch.int32, pin_memory=cuda)
            self._dev = (self._masks.to(logits.device), self._rows.to(logits.device)) if cuda else None
        masks, idx = self._masks[:n], self._rows[:n]
        self.executor.unsafe_compute_mask_ptr(
            list(zip(matchers, range(n))), masks.data_ptr(), self.words * 4, n
        )
        buf = masks.numpy()
        np.bitwise_and(buf, self._valid_words, out=buf)
        idx.numpy()[:] = rows
        with torch.inference_mode():
            if cuda:
                from fusionserve.kernels.token_bitmask import apply_token_bitmask

                dev_masks, dev_rows = self._dev[0][:n], self._dev[1][:n]
                dev_masks.copy_(masks, non_blocking=True)
                dev_rows.copy_(idx, non_blocking=True)
                apply_token_bitmask(logits, dev_masks, dev_rows)
            else:
                reference.token_bitmask(logits, masks, idx)

    def consume(self, rows: list[Any], token_ids: list[int]) -> None:
        """Feed a collected step's ids to its live constrained rows, all at once (llguidance's
        threads, no GIL): one call per step, not a Python round trip per row. Sets
        `Choice.grammar_done` where the grammar is complete (or, never expected with the mask
        applied, refused the id: the output ends rather than go astray)."""
        live = [
            (ch, tok) for ch, tok in zip(rows, token_ids) if ch.matcher is not None and not ch.seq_finished()
        ]
        if not live:
            return
        results = self.executor.consume_token_par([(ch.matcher, tok) for ch, tok in live])
        for (ch, tok), ok in zip(live, results):
            if not ok:
                log.warning(
                    "grammar refused token %d of %s: %s", tok, ch.request.request_id, ch.matcher.get_error()
                )
            ch.grammar_done = not ok or ch.matcher.is_stopped()

    @classmethod
    def for_model(cls, tokenizer: Any, decoder: Any, eos_ids: frozenset[int]) -> GrammarMatchers:
        if tokenizer is None:
            raise ValueError("structured output needs the model's tokenizer")
        return cls(
            tokenizer.model_dir / "tokenizer.json",
            decoder.config.vocab_size,
            tokenizer.vocab_size,
            eos_ids,
        )


class ParkedRequests:
    """Requests whose grammar is still compiling: scheduled once it is, aborted if it failed."""

    def __init__(self) -> None:
        self.items: list[tuple[Future, Any]] = []

    def __bool__(self) -> bool:
        return bool(self.items)

    def add(self, compiled: Future, req: Any) -> None:
        self.items.append((compiled, req))

    def take_done(self, live: dict[str, Any], idle: bool) -> tuple[list[Any], list[Any]]:
        """(ready, failed) among those still in `live` (not aborted meanwhile); when the engine is
        otherwise idle, waits up to 5 ms for one to finish rather than spin."""
        if idle:
            wait([c for c, _ in self.items], timeout=0.005, return_when=FIRST_COMPLETED)
        ready, failed, waiting = [], [], []
        for compiled, req in self.items:
            if not compiled.done():
                waiting.append((compiled, req))
            elif live.get(req.request_id) is req:
                if compiled.exception() is None:
                    ready.append(req)
                else:
                    log.error("grammar of %s failed to compile: %s", req.request_id, compiled.exception())
                    failed.append(req)
        self.items = waiting
        return ready, failed
