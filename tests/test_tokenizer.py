"""Our Tokenizer vs transformers on the default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusionserve.models.tokenizer import IncrementalDetokenizer, Tokenizer

# Code, emoji (incl. ZWJ/flags), CJK, Korean, accents, digits, tabs/newlines and whitespace runs.
# No whitespace run sits directly before a digit: there transformers' GGUF tokenizer departs from
# the true SmolLM2 tokenizer (see test_digits_split_like_true_smollm2 and gguf_convert.py).
MIXED = (
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n"
    "print(fib(30))  # 832040\t\ttabs   and    spaces   \n"
    "Emoji 😀👍🏽🇫🇷 👨‍👩‍👧 ❤️ — “quotes” café naïve Ångström\n"
    "中文：你好，世界！日本語のテキスト。한국어 텍스트입니다.\n"
    'Version 3.14.159, year 2024, x=12345; {"k": [1,2,3]}   \n\n\n  end'
)


@pytest.fixture(scope="module")
def tok(default_model_dir: Path) -> Tokenizer:
    return Tokenizer(default_model_dir)


@pytest.fixture(scope="module")
def hf_gguf_tok(default_gguf_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_gguf_path.parent, gguf_file=default_gguf_path.name)


def test_ids_match_transformers_gguf_tokenizer(tok: Tokenizer, hf_gguf_tok) -> None:
    ours = tok.encode(MIXED, add_special_tokens=False)
    assert ours == hf_gguf_tok.encode(MIXED, add_special_tokens=False)
    assert tok.encode(MIXED) == hf_gguf_tok.encode(MIXED)  # add_bos_token is False for SmolLM2
    assert tok.decode(ours) == MIXED
    specials = "<|im_start|>user\nhi<|im_end|>"
    assert tok.encode(specials) == hf_gguf_tok.encode(specials) == [1, 4093, 198, 6004, 2]


def test_transformers_reads_our_folder(tok: Tokenizer, default_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(default_model_dir)
    text = MIXED + "\n  12 \n 7"
    assert hf.encode(text) == tok.encode(text)
    assert hf.eos_token_id == 2 and hf.bos_token_id == 1


def test_digits_split_like_true_smollm2(tok: Tokenizer) -> None:
    def pieces(text: str) -> list[str]:
        return [tok.id_to_token(i) for i in tok.encode(text, add_special_tokens=False)]

    assert pieces("12345") == ["1", "2", "3", "4", "5"]
    assert pieces("x=3.14") == ["x", "=", "3", ".", "1", "4"]
    assert all(len(tok.encode(str(d), add_special_tokens=False)) == 1 for d in range(10))
    # Where the true tokenizer (Digits before ByteLevel) and transformers' GGUF fallback
    # (ByteLevel alone) disagree, we follow the true one: the digit is split off first, so the
    # whole whitespace run stays one pre-token.
    assert pieces("  12") == ["ĠĠ", "1", "2"]  # transformers: Ġ Ġ 1 2
    assert pieces("a\n 7") == ["a", "ĊĠ", "7"]  # transformers: a Ċ Ġ 7
    assert pieces(" ½") == ["Ġ", "Â½"]  # transformers: ĠÂ ½
    for text in ("  12", "a\n 7", " ½", "x  42 ³"):
        assert tok.decode(tok.encode(text)) == text


CHATS = [
    [{"role": "user", "content": "Hello! What's 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, 中文 ok 😀"},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CHATS, ids=["no_system", "system"])
def test_chat_template_matches_transformers(
    tok: Tokenizer, hf_gguf_tok, messages, add_generation_prompt
) -> None:
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    ref = hf_gguf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == ref
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    if messages[0]["role"] != "system":
        assert ours.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    ref_ids = hf_gguf_tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    if isinstance(ref_ids, dict) or hasattr(ref_ids, "input_ids"):
        ref_ids = ref_ids["input_ids"]
    assert tok.encode(ours, add_special_tokens=False) == list(ref_ids)


def test_chat_template_flattens_content_parts(tok: Tokenizer) -> None:
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}
    ]
    plain = [{"role": "user", "content": "Hello there"}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template(plain)
    with pytest.raises(ValueError, match="image_url"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_chat_template_raise_exception(default_model_dir: Path) -> None:
    from jinja2.exceptions import TemplateError

    t = Tokenizer(default_model_dir)
    t.chat_template = "{% if messages|length == 0 %}{{ raise_exception('need messages') }}{% endif %}ok"
    with pytest.raises(TemplateError, match="need messages"):
        t.apply_chat_template([])
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"


def test_special_ids(tok: Tokenizer) -> None:
    assert tok.eos_token_ids == frozenset({2})
    assert tok.bos_token_id == 1
    assert tok.vocab_size == 49152
    assert tok.id_to_token(2) == "<|im_end|>"
    assert tok.decode([6004, 2]) == "hi"
    assert tok.decode([6004, 2], skip_special_tokens=False) == "hi<|im_end|>"


def test_eos_ids_merge_generation_config_list(tmp_path: Path, default_model_dir: Path) -> None:
    import json
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 7]}))
    assert Tokenizer(tmp_path).eos_token_ids == frozenset({0, 2, 7})


STREAM_TEXT = "Hi 😀👍🏽🇫🇷 中文字符 日本語 한국어 ✓ café\n  done 👨‍👩‍👧!"


def test_incremental_detokenizer(tok: Tokenizer) -> None:
    ids = tok.encode(STREAM_TEXT, add_special_tokens=False)
    # Several tokens must be partial UTF-8 for this test to mean anything.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == STREAM_TEXT
    assert detok.text == STREAM_TEXT


def test_incremental_detokenizer_specials_and_prompt(tok: Tokenizer) -> None:
    prompt = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "hi"}]), add_special_tokens=False
    )
    gen = tok.encode("中文 ok", add_special_tokens=False) + [2]
    d = IncrementalDetokenizer(tok, prompt_ids=prompt)
    out = "".join(d.push(i) for i in gen) + d.flush()
    assert out == tok.decode(gen) == "中文 ok"
    d = IncrementalDetokenizer(tok, skip_special_tokens=False)
    out = "".join(d.push(i) for i in gen) + d.flush()
    assert out == tok.decode(gen, skip_special_tokens=False) == "中文 ok<|im_end|>"


def test_incremental_detokenizer_flush_emits_held_partial(tok: Tokenizer) -> None:
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1
    d = IncrementalDetokenizer(tok)
    assert d.push(ids[0]) == ""  # held: incomplete character
    assert d.flush() == tok.decode(ids[:1])  # generation ended mid-character: emit what we have
