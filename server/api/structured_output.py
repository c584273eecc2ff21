"""A request's output constraint as one llguidance grammar, validated before anything is queued.

The sources, with OpenAI's and vLLM's meaning: `response_format` (`json_object`, `json_schema`),
vLLM's `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (Lark or GBNF) and
`structured_outputs` (`json`, `regex`, `choice`, `grammar`, `json_object`), and the tool-call
grammar of `tool_choice` `required` or a named function (server/api/tool_calls.py). At most one
may be given. The grammar text travels to the engine in `SamplingParams.grammar`; the engine
compiles and caches it (server/engine/structured.py).

Validation compiles the grammar against the model's tokenizer on a worker thread with a time limit,
so a hard grammar never stalls the event loop, and caches the verdict by grammar text: a bad schema,
regex or grammar is a 400 naming its parameter, a grammar that takes too long to compile a 400 too.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusionserve.server.api.protocol import ProtocolError

#: vLLM's guided_* request fields and the constraint kind each asks for.
_SOURCES = (
    ("guided_json", "json"),
    ("guided_regex", "regex"),
    ("guided_choice", "choice"),
    ("guided_grammar", "grammar"),
)
_STRUCTURED_KEYS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar"}


#: JSON is written as Python's json.dumps writes it ("a": 1, "b": 2): free whitespace lets a small
#: model loop on newlines until max_tokens, and costs tokens. A schema's "x-guidance" may override.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Constraint:
    """One llguidance grammar and the request parameter it came from (for 400s)."""

    grammar: str
    param: str
    kind: str  # json | json_object | regex | choice | grammar | tools


def _unsupported(message: str, param: str) -> ProtocolError:
    return ProtocolError(message, param=param, code="invalid_value")


def grammar_text(kind: str, spec: Any, param: str, layout: dict[str, Any] | None = None) -> str:
    """The llguidance grammar for one constraint spec (shape errors are 400s naming `param`);
    `layout`: the JSON compile options (default JSON_LAYOUT)."""
    layout = layout or JSON_LAYOUT
    import llguidance

    ll = llguidance.LLMatcher
    try:
        if kind == "json":
            if isinstance(spec, str):
                spec = json.loads(spec)
            if not isinstance(spec, dict | bool):
                raise ValueError("a JSON schema must be an object")
            return ll.grammar_from_json_schema(spec, defaults=layout)
        if kind == "json_object":
            return ll.grammar_from_json_schema({"type": "object"}, defaults=layout)
        if kind == "regex":
            if not isinstance(spec, str) or not spec:
                raise ValueError("a regex must be a non-empty string")
            return ll.grammar_from_regex(spec)
        if kind == "choice":
            if not isinstance(spec, list) or not spec or not all(isinstance(c, str) and c for c in spec):
                raise ValueError("a choice must be a non-empty list of non-empty strings")
            return llguidance.grammar_from("choice", json.dumps(spec))
        if kind == "grammar":
            if not isinstance(spec, str) or not spec.strip():
                raise ValueError("a grammar must be a non-empty string (Lark or GBNF)")
            return llguidance.grammar_from("grammar", spec)
    except (ValueError, TypeError) as exc:
        raise _unsupported(f"invalid {param}: {str(exc)[:300]}", param) from None
    raise _unsupported(f"unknown constraint kind {kind!r}", param)


def _response_format(rf: Any) -> tuple[str, Any] | None:
    """OpenAI's response_format → (kind, spec), None for text."""
    kind = rf.type
    extra = rf.model_extra or {}
    if kind == "text":
        return None
    if kind == "json_object":
        return "json_object", None
    if kind == "json_schema":
        js = extra.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js and "json_schema" not in js:
            raise _unsupported(
                "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                "response_format",
            )
        return "json", js.get("schema", js.get("json_schema"))
    raise _unsupported(
        f"response_format type {kind!r} is not supported (text, json_object, json_schema)", "response_format"
    )


def request_constraint(req: Any) -> Constraint | None:
    """The single output constraint a request asks for (two at once is a 400)."""
    found: list[tuple[str, str, Any]] = []
    rf = getattr(req, "response_format", None)
    if rf is not None:
        got = _response_format(rf)
        if got is not None:
            found.append(("response_format", *got))
    for attr, kind in _SOURCES:
        value = getattr(req, attr, None)
        if value is not None:
            found.append((attr, kind, value))
    so = getattr(req, "structured_outputs", None)
    if so:
        if not isinstance(so, dict):
            raise _unsupported("structured_outputs must be an object", "structured_outputs")
        for key, value in so.items():
            if key == "json_object" and value:
                found.append(("structured_outputs.json_object", "json_object", None))
            elif key in _STRUCTURED_KEYS and value is not None:
                found.append((f"structured_outputs.{key}", _STRUCTURED_KEYS[key], value))
            elif key not in (
                "json_object",
                "disable_fallback",
                "disable_any_whitespace",
                "whitespace_pattern",
            ):
                raise _unsupported(f"structured_outputs.{key} is not supported", f"structured_outputs.{key}")
    pattern = getattr(req, "guided_whitespace_pattern", None) or (so or {}).get("whitespace_pattern")
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(p for p, _, _ in found)
        raise _unsupported(f"only one output constraint may be given (got {names})", found[1][0])
    param, kind, spec = found[0]
    # vLLM's whitespace pattern for JSON; without one, JSON_LAYOUT (its disable_any_whitespace).
    layout = (
        {"whitespace_flexible": True, "whitespace_pattern": pattern} if isinstance(pattern, str) else None
    )
    return Constraint(grammar_text(kind, spec, param, layout), param, kind)


class GrammarValidator:
    """Compiles each new grammar once against the model's tokenizer, off the event loop, with a
    time limit; remembers the verdict (LRU by grammar text)."""

    def __init__(
        self, tokenizer_json: Path | None, vocab_size: int, timeout_s: float = 10.0, cache_size: int = 1024
    ) -> None:
        self.tokenizer_json, self.vocab_size, self.timeout_s = tokenizer_json, vocab_size, timeout_s
        self._tokenizer: Any = None
        self._verdicts: OrderedDict[str, str] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fusionserve-grammar-check")

    def _compile(self, grammar: str) -> str:
        import llguidance

        with self._lock:
            if self._tokenizer is None and self.tokenizer_json is not None:
                self._tokenizer = llguidance.LLTokenizer(str(self.tokenizer_json), n_vocab=self.vocab_size)
            tok = self._tokenizer
        return llguidance.LLMatcher.validate_grammar(grammar, tok)

    async def check(self, constraint: Constraint) -> None:
        """400 naming the parameter when the grammar does not compile (or not within the limit)."""
        with self._lock:
            verdict = self._verdicts.get(constraint.grammar)
        if verdict is None:
            loop = asyncio.get_running_loop()
            try:
                verdict = await asyncio.wait_for(
                    loop.run_in_executor(self._pool, self._compile, constraint.grammar), self.timeout_s
                )
            except asyncio.TimeoutError:
                raise _unsupported(
                    f"{constraint.param}: the grammar did not compile within {self.timeout_s:.0f}s; "
                    "simplify it",
                    constraint.param,
                ) from None
            with self._lock:
                self._verdicts[constraint.grammar] = verdict
                while len(self._verdicts) > self._cache_size:
                    self._verdicts.popitem(last=False)
        if verdict and not verdict.startswith("WARNING"):
            raise _unsupported(f"invalid {constraint.param}: {verdict[:400]}", constraint.param)
