"""The engine on the default model (SmolLM2-135M, real tokenizer): invariance, fusion switching, stop strings."""

from __future__ import annotations

import pytest
import torch

from fusionserve.models.decoder import Decoder
from fusionserve.models.generate import GenerateOptions, generate_ids
from fusionserve.models.tokenizer import Tokenizer
from fusionserve.server.api.fusion import FusionTimings
from fusionserve.server.contract import EngineConfig, SamplingParams
from fusionserve.server.engine.llm_engine import LLMEngine

TEXTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a dark forest, there lived",
    "Q: What is the boiling point of water?\nA:",
    "Hello",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "List three colors:",
    "In 1969, the first humans",
    "Translate to French: good morning",
    "import numpy as np\nx = np.",
    "My favourite food is",
    "The theory of relativity, developed by Albert Einstein in the early twentieth century, says that",
    "Rain",
    "Step 1: preheat the oven. Step 2:",
]


@pytest.fixture(scope="module")
def default(default_model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier than 2 threads on a shared 2-core runner
    yield (
        default_model_dir,
        Decoder.from_pretrained(default_model_dir, progress=False),
        Tokenizer(default_model_dir),
    )
    torch.set_num_threads(threads)


def engine(default, **kw) -> LLMEngine:
    path, dec, tok = default
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("layer_timing_every", 0)
    return LLMEngine(EngineConfig(model_dir=str(path), **kw), decoder=dec, tokenizer=tok)


def encode(default, texts):
    tok = default[2]
    return [tok.encode(t) for t in texts]


def test_batch_invariance_16_greedy_default(default):
    ps = encode(default, TEXTS)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    eng = engine(default, enable_prefix_caching=False)
    together = [o[0].token_ids for o in eng.generate(ps, params)]
    alone = [eng.generate([p], params)[0][0].token_ids for p in ps]
    assert together == alone


def test_fusion_switch_mid_generation_keeps_greedy_text(default):
    ps = encode(default, TEXTS[:4])
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    reference = [o[0].token_ids for o in engine(default, fusion="on").generate(ps, params)]
    eng = engine(default, fusion="on", layer_timing_every=3)
    for i, p in enumerate(ps):
        eng.add_request(str(i), p, params)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(ps))}
    modes = ["off", "ab", "on", "ab", "off"]
    while eng.has_unfinished():
        for out in eng.step():
            got[out.request_id] += out.token_ids
        if eng.num_steps % 2 == 0 and modes:
            eng.fusion.set_mode(modes.pop(0))
    assert [got[str(i)] for i in range(len(ps))] == reference
    timings = FusionTimings()
    timings.record(eng.take_step_stats())
    assert {"on", "off"} <= set(timings.summary(eng.fusion.mode)["steps"])


def test_flash_sampling_draws_what_the_sampler_draws(default):
    """Fused steps' plain rows draw their tokens in the LM head (FlashSampling); the same seeded and
    greedy requests give the same tokens drawn from written logits (flash off), with fusion off, and
    with launch-ahead off. A step that also holds a top-p row and a logprobs row still draws the
    plain rows in the LM head, which writes the logits of those two for the sampler in the same pass."""
    ps = encode(default, TEXTS[:3])
    params = [
        SamplingParams(max_tokens=10, temperature=0.9, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=1.3, seed=11, n=1, ignore_eos=True),
    ]
    runs = {}
    for kw in (dict(), dict(flash_sampling=False), dict(fusion="off"), dict(overlap=False)):
        eng = engine(default, **kw)
        drawn_steps = []
        plan = eng.sampler.lm_head_draw
        eng.sampler.lm_head_draw = lambda *a, plan=plan, seen=drawn_steps: seen.append(plan(*a)) or seen[-1]
        runs[tuple(kw.items())] = [o[0].token_ids for o in eng.generate(ps, params)]
        flash_steps = sum(d is not None for d in drawn_steps)
        assert flash_steps >= 10 if kw in (dict(), dict(overlap=False)) else flash_steps == 0, kw
    first = runs[()]
    assert all(r == first for r in runs.values()), runs
    assert len(set(first[0])) > 3  # sampled, not stuck
    # the one-sequence loop (`fusionserve generate`) keys its draws as the engine keys choice 0
    for prompt, p, tokens in zip(ps, params, first):
        opts = GenerateOptions(max_new_tokens=p.max_tokens, temperature=p.temperature, seed=p.seed)
        assert list(generate_ids(default[1], prompt, opts)) == tokens
    others = [
        SamplingParams(max_tokens=10, top_p=0.8, seed=2, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0, logprobs=2, ignore_eos=True),
    ]
    mixed = {}
    for flash in (True, False):
        eng = engine(default, flash_sampling=flash)
        plan = eng.sampler.lm_head_draw
        drawn_steps = []
        eng.sampler.lm_head_draw = lambda *a, plan=plan, seen=drawn_steps: seen.append(plan(*a)) or seen[-1]
        outs = eng.generate(ps + ps[:2], params + others)
        mixed[flash] = [(o[0].token_ids, [lp.logprob for lp in o[0].logprobs or []]) for o in outs]
        assert [o[0].token_ids for o in outs[:3]] == first
        assert sum(d is not None and d.rest != [] for d in drawn_steps) >= (9 if flash else 0)
    assert mixed[True] == mixed[False]  # the sampler's rows too: same tokens, same logprobs


def test_stop_strings_across_token_boundaries(default):
    _, _, tok = default
    prompt = encode(
        default, ["Once upon a time, in a small village at the edge of a dark forest, there lived"]
    )[0]
    plain = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    eng = engine(default)
    full = eng.generate([prompt], plain)[0][0]
    pieces = [tok.decode([t]) for t in full.token_ids]
    assert "".join(pieces) == full.text
    k = next(i for i in range(len(pieces) - 2) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1] + pieces[k + 2][:1]  # spans three tokens
    expected = full.text[: full.text.find(stop)]

    eng.add_request("s", prompt, SamplingParams(**{**plain.__dict__, "stop": ("never-there", stop)}))
    deltas = []
    while eng.has_unfinished():
        deltas += eng.step()
    text = "".join(d.text for d in deltas)
    assert text == expected and stop not in text
    assert deltas[-1].finished and deltas[-1].finish_reason == "stop"
    assert sum(len(d.token_ids) for d in deltas) < len(full.token_ids)
    assert eng.blocks.check_all_free()


def test_eos_ends_generation(default):
    _, _, tok = default
    chat = tok.apply_chat_template([{"role": "user", "content": "Say hi."}])
    out = engine(default).generate(
        [tok.encode(chat, add_special_tokens=False)], SamplingParams(max_tokens=64, temperature=0)
    )
    choice = out[0][0]
    assert choice.finish_reason == "stop" and choice.token_ids[-1] in tok.eos_token_ids
    assert choice.text and "<|im_end|>" not in choice.text


def test_stop_strings_cut_exactly_with_overlap(default):
    """A stop string found after step n+1 was launched: same text, tokens and reason as without overlap."""
    _, _, tok = default
    ps = encode(default, TEXTS[:8])
    plain = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    full = engine(default, overlap=False).generate(ps, plain)
    plist = []
    for o in full:
        text = o[0].text
        stop = text[len(text) // 3 : len(text) // 3 + 3] or "zz"  # cut somewhere in the middle
        plist.append(SamplingParams(**{**plain.__dict__, "stop": (stop,)}))
    runs = []
    for overlap in (False, True):
        eng = engine(default, overlap=overlap)
        out = eng.generate(ps, plist)
        runs.append([(o[0].text, o[0].token_ids, o[0].finish_reason) for o in out])
        assert eng.blocks.check_all_free()
    assert runs[0] == runs[1]
    for (text, token_ids, reason), p, o in zip(runs[1], plist, full):
        assert reason == "stop" and p.stop[0] not in text
        assert text == o[0].text[: o[0].text.find(p.stop[0])]
        assert len(token_ids) < len(o[0].token_ids)  # the token launched after the stop is dropped


def test_constrained_rows_match_fused_and_off_and_leak_nothing(default):
    """A JSON-schema row and an unconstrained one in the same steps: identical greedy text with
    fusion on and off and with launch-ahead on and off; aborting constrained requests (one still
    waiting for its grammar to compile) frees every block, choice and matcher."""
    import json

    import llguidance

    from fusionserve.server.api.structured_output import JSON_LAYOUT

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 10}},
        "required": ["city"],
    }
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    eng = engine(default)
    tok = eng.tokenizer
    prompt = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "Name a city as JSON."}]),
        add_special_tokens=False,
    )
    params = [
        SamplingParams(max_tokens=40, temperature=0, grammar=grammar),
        SamplingParams(max_tokens=12, temperature=0),
    ]
    texts = []
    for fusion, overlap in (("on", True), ("off", True), ("on", False)):
        e = engine(default, fusion=fusion, overlap=overlap)
        outs = e.generate([prompt, prompt], params)
        texts.append([o[0].text for o in outs])
        assert outs[0][0].finish_reason == "stop" and "city" in json.loads(outs[0][0].text)
    assert texts[0] == texts[1] == texts[2]
    # Not compiled yet (parked), and at least 80 letters: it cannot finish within the three steps
    # below even when its compile wins the race (CI once saw a 2..30-letter one finish first).
    fresh = llguidance.LLMatcher.grammar_from_regex(r"[a-z]{80,100}")
    eng.add_request(
        "c1", prompt, SamplingParams(max_tokens=200, temperature=0.8, seed=1, grammar=grammar, n=2)
    )
    eng.add_request("c2", prompt, SamplingParams(max_tokens=200, grammar=fresh))
    for _ in range(3):
        eng.step()
    aborted = eng.abort_request("c1") + eng.abort_request("c2")
    assert {(o.request_id, o.finish_reason) for o in aborted} == {("c1", "abort"), ("c2", "abort")}
    while eng.has_unfinished():
        eng.step()
    assert eng.choices == {} and eng.requests == {} and not eng._parked and eng.blocks.check_all_free()
