"""Tokenizer for a model folder: `tokenizers` for ids, jinja2 for the chat template.

We avoid `transformers` at serve time (import cost, version drift); this class reads the same
three files transformers does (tokenizer.json, tokenizer_config.json, generation_config.json)
and renders chat templates the same way, so prompts are byte-identical to what the model was
trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

__all__ = ["IncrementalDetokenizer", "Tokenizer", "flatten_content"]

_REPLACEMENT = "\ufffd"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_str(value: Any) -> str | None:
    """Special tokens in tokenizer_config.json are a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def flatten_content(content: Any) -> Any:
    """OpenAI-style content parts [{"type": "text", "text": ...}] → one string.

    Chat templates (SmolLM2's among them) concatenate `message['content']` as a string, so list
    content must be flattened before rendering. Non-text parts are rejected: we serve text models.
    """
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(f"unsupported message content part of type {kind!r} (only 'text' is supported)")
    return "".join(texts)


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False
) -> str:
    # Same as transformers: templates expect non-ASCII kept and no HTML escaping.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class Tokenizer:
    """Encode/decode and chat-template rendering for one model folder."""

    def __init__(self, model_dir: str | Path) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        self.model_dir = Path(model_dir)
        tok_file = self.model_dir / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: missing (is {self.model_dir} a model folder?)")
        self._tok = _HFTokenizer.from_file(str(tok_file))
        self.config = _read_json(self.model_dir / "tokenizer_config.json")
        self.generation_config = _read_json(self.model_dir / "generation_config.json")
        self.chat_template: str | None = self._pick_template(self.config.get("chat_template"))
        if self.chat_template is None:
            jinja = self.model_dir / "chat_template.jinja"
            if jinja.is_file():
                self.chat_template = jinja.read_text(encoding="utf-8")

        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.pad_token = _token_str(self.config.get("pad_token"))
        self.unk_token = _token_str(self.config.get("unk_token"))

    @staticmethod
    def _pick_template(template: Any) -> str | None:
        # tokenizer_config may hold a list of named templates; "default" is what transformers uses.
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            return named.get("default")
        return template if isinstance(template, str) else None

    # ---- ids ------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text → ids. `add_special_tokens` applies the post-processor (BOS if the model wants it);
        pass False for already-templated chat prompts, as transformers does."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids → text; control tokens (e.g. <|im_end|>) are dropped unless asked for."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary spelling of one id (byte-level alphabet, not decoded text)."""
        return self._tok.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocab plus added tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        bos = self.generation_config.get("bos_token_id")
        if isinstance(bos, int):
            return bos
        return self._tok.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def pad_token_id(self) -> int | None:
        return self._tok.token_to_id(self.pad_token) if self.pad_token else None

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: generation_config's eos (int or list) + the tokenizer's
        eos. Instruct models often stop on more than one token, so a set, not one id."""
        ids: set[int] = set()
        eos = self.generation_config.get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(i) for i in eos)
        if self.eos_token:
            tid = self._tok.token_to_id(self.eos_token)
            if tid is not None:
                ids.add(tid)
        return frozenset(ids)

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of tokens marked special (skipped by decode(skip_special_tokens=True))."""
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    # ---- chat ----------------------------------------------------------------------------------

    @cached_property
    def _compiled_template(self) -> Any:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not self.chat_template:
            raise ValueError(f"{self.model_dir}: the tokenizer has no chat_template")
        # Same environment as transformers' apply_chat_template: sandboxed (templates come from
        # model repos), trim/lstrip blocks, loop controls, and its helper functions.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        return env.from_string(self.chat_template)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the model's chat template into the prompt string."""
        flat = []
        for m in messages:
            m = dict(m)
            if "content" in m:
                m["content"] = flatten_content(m["content"])
            flat.append(m)
        context: dict[str, Any] = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
            "unk_token": self.unk_token or "",
        }
        context.update(kwargs)
        return self._compiled_template.render(
            messages=flat, add_generation_prompt=add_generation_prompt, **context
        )


class IncrementalDetokenizer:
    """Streams text as tokens arrive, emitting only complete characters.

    A byte-level token may hold part of a multi-byte UTF-8 character; decoding it alone yields
    U+FFFD. We keep a small window of ids (prefix..read offsets, as vLLM does), decode it each
    push, and hold text back while it ends in U+FFFD, so clients never see a broken character and
    the concatenation of all pushes (plus flush) equals decode(all ids).
    """

    # Ids of prompt context kept before the first generated token (some decoders, e.g.
    # sentencepiece Metaspace, strip a leading space at the start of a decode).
    _CONTEXT = 5

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids or [])[-self._CONTEXT :]
        self._ids: list[int] = context
        self._prefix = 0  # start of the decode window
        self._read = len(context)  # ids before this are already emitted
        self._n_context = len(context)
        self.text = ""  # everything emitted so far

    @property
    def ids(self) -> list[int]:
        """All ids pushed (excluding prompt context)."""
        return self._ids[self._n_context :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly completed text (possibly "")."""
        self._ids.append(int(token_id))
        return self._emit(final=False)

    def _emit(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if not final and full.endswith(_REPLACEMENT):
            return ""  # partial UTF-8 sequence: wait for the next token
        if len(full) <= len(prefix_text) and not final:
            # Nothing new (e.g. a skipped special token); don't move the window.
            return ""
        new = full[len(prefix_text) :]
        self._prefix = self._read
        self._read = len(self._ids)
        self.text += new
        return new

    def flush(self) -> str:
        """Emit whatever is held back (at end of generation), even an incomplete character."""
        if self._read >= len(self._ids):
            return ""
        return self._emit(final=True)


def load_tokenizer(model_dir: Path | str | None) -> Tokenizer | None:
    """The model folder's tokenizer.json, or None (a model served by token ids only)."""
    if model_dir is None or not (Path(model_dir) / "tokenizer.json").is_file():
        return None
    return Tokenizer(model_dir)
