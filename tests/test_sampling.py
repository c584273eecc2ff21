"""Sampler on synthetic logits: each parameter per row, seeds independent of the batch, logprobs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from fusionserve.kernels.batch import choice_noise_seed
from fusionserve.server.contract import SamplingParams
from fusionserve.server.engine.sampler import Sampler

V = 32


@dataclass
class Row:
    """What the engine hands the sampler for one row."""

    params: SamplingParams
    tokens: list[int]  # prompt + generated so far (penalties; its length is the position drawn)
    num_prompt: int
    noise_seed: int | None  # None → a fresh key from the sampler's generator


def sample(sampler: Sampler, logits: torch.Tensor, rows: list[Row]):
    """The engine's call: launch on the device, then the one wait for ids (and logprobs)."""
    handle = sampler.launch(
        logits,
        [r.params for r in rows],
        [sampler.key(r.params, r.noise_seed, len(r.tokens)) for r in rows],
        lambda i: (rows[i].tokens, rows[i].num_prompt),
    )
    return handle.token_ids(), handle.logprobs()


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def row(params: SamplingParams, tokens=(5, 6), num_prompt=1, noise_seed=None) -> Row:
    return Row(params, list(tokens), num_prompt, noise_seed)


def test_greedy_and_top_k_one_are_argmax():
    z = logits_rows(3)
    ids, lps = sample(
        Sampler(seed=0),
        z.clone(),
        [
            row(SamplingParams(temperature=0)),
            row(SamplingParams(top_k=1)),
            row(SamplingParams(temperature=0)),
        ],
    )
    assert ids == z.argmax(-1).tolist()
    assert lps == [None, None, None]


def test_top_k_top_p_min_p_restrict_support():
    z = torch.tensor([[4.0, 3.0, 2.0, 1.0] + [-10.0] * (V - 4)])
    s = Sampler(seed=0)
    cases = {
        SamplingParams(temperature=1.0, top_k=2): {0, 1},
        SamplingParams(temperature=1.0, top_p=0.5): {0},  # p(top) ≈ 0.64 ≥ 0.5
        SamplingParams(temperature=1.0, top_p=0.9): {0, 1, 2},  # 0.64 + 0.24 < 0.9
        SamplingParams(temperature=1.0, min_p=0.3): {0, 1},  # e^-1 ≈ 0.37 ≥ 0.3, e^-2 < 0.3
    }
    for params, allowed in cases.items():
        seen = set()
        for _ in range(200):
            ids, _ = sample(s, z.clone(), [row(params)])
            seen.add(ids[0])
        assert seen == allowed, params


def test_gumbel_max_matches_softmax_distribution():
    z = torch.tensor([[1.0, 0.0, -1.0, 0.5] + [-30.0] * (V - 4)])
    s = Sampler(seed=1)
    params = SamplingParams(temperature=0.7)
    draws = 4000
    batch = z.repeat(draws, 1)
    ids, _ = sample(s, batch, [row(params)] * draws)
    freq = torch.bincount(torch.tensor(ids), minlength=V)[:4].float() / draws
    expected = torch.softmax(z[0] / 0.7, -1)[:4]
    assert torch.allclose(freq, expected, atol=0.03)


def test_seeded_row_ignores_batch_composition():
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    z = logits_rows(5, seed=3)
    s = Sampler(seed=0)

    def draw_sequence(make_batch) -> list[int]:
        out = []
        for step in range(20):
            zs, rows, at = make_batch(list(range(step + 3)))  # one more token each step
            out.append(sample(s, zs, rows)[0][at])
        return out

    seed = choice_noise_seed(42, 0)
    alone = draw_sequence(lambda toks: (z[2:3].clone(), [row(params, toks, noise_seed=seed)], 0))
    crowd = draw_sequence(
        lambda toks: (
            z.clone(),
            [row(SamplingParams(temperature=1.0))] * 2
            + [row(params, toks, noise_seed=seed)]
            + [row(SamplingParams(seed=7), noise_seed=choice_noise_seed(7, 0))] * 2,
            2,
        )
    )
    assert alone == crowd
    assert len(set(alone)) > 1
    # Another choice of the same request, or another seed, draws other noise.
    other = draw_sequence(
        lambda toks: (z[2:3].clone(), [row(params, toks, noise_seed=choice_noise_seed(42, 1))], 0)
    )
    assert other != alone


def test_lm_head_draw_takes_only_plain_rows():
    """FlashSampling: the LM head draws the plain rows (greedy or temperature only) with T (0 greedy)
    and the keys `launch` would use; every other logit row is flagged T = -1 and gets its logits
    written for the sampler in the same pass (`rest`); no plain row, no draw."""
    from types import SimpleNamespace

    def choice(params, seed=None, matcher=None, forks=0):
        seq = SimpleNamespace(num_tokens=7, pending_forks=forks)
        return SimpleNamespace(
            request=SimpleNamespace(params=params), noise_seed=seed, seq=seq, matcher=matcher
        )

    s = Sampler(seed=0)
    plain = [choice(SamplingParams(temperature=0)), choice(SamplingParams(temperature=0.8, seed=3), seed=11)]
    drawn = s.lm_head_draw(plain + [choice(SamplingParams(top_p=0.5))], [0, None, None], 1, 50)
    assert drawn.rows == plain[:1] and drawn.rest == [] and not drawn.draw.random  # unsampled rows skipped
    assert drawn.draw.logits is None  # every logit row drawn: no logits written
    drawn = s.lm_head_draw(plain, [0, 1], 2, 50)
    assert drawn.draw.temps.tolist() == [0.0, pytest.approx(0.8)] and drawn.draw.random
    assert drawn.draw.keys.tolist() == [0, s.key(plain[1].request.params, 11, 7)]
    for odd in (
        choice(SamplingParams(top_k=5)),
        choice(SamplingParams(min_p=0.1)),
        choice(SamplingParams(temperature=0, logprobs=1)),
        choice(SamplingParams(temperature=0, logit_bias=((1, 1.0),))),
        choice(SamplingParams(temperature=0, presence_penalty=0.5)),
        choice(SamplingParams(temperature=0), matcher=object()),
        choice(SamplingParams(temperature=0.5), forks=2),
    ):
        mixed = s.lm_head_draw([odd, plain[0]], [1, 3], 4, 50)  # rows 0 and 2: prompt-logprob positions
        assert (
            mixed.rows == [plain[0]] and mixed.at == [3] and mixed.rest == [odd] and mixed.rest_index == [1]
        )
        assert mixed.draw.temps.tolist() == [-1.0, -1.0, -1.0, 0.0] and mixed.draw.logits.shape == (4, 50)
        assert s.lm_head_draw([odd], [0], 1, 50) is None
    assert s.lm_head_draw(plain, [None, None], 0, 50) is None


def test_logit_bias_and_penalties():
    z = torch.zeros(1, V)
    z[0, 3] = 2.0
    s = Sampler(seed=0)
    ids, _ = sample(s, z.clone(), [row(SamplingParams(temperature=0, logit_bias=((9, 5.0),)))])
    assert ids == [9]
    # token 3 appeared in the output: frequency/presence push it below 0; repetition divides it
    for params in (
        SamplingParams(temperature=0, frequency_penalty=1.5),
        SamplingParams(temperature=0, presence_penalty=2.5),
        SamplingParams(temperature=0, repetition_penalty=100.0),
    ):
        zz = z.clone()
        zz[0, 4] = 0.5
        ids, _ = sample(s, zz, [row(params, tokens=(1, 3, 3), num_prompt=1)])
        assert ids == [4], params
    # presence/frequency only look at generated tokens; repetition also at the prompt
    ids, _ = sample(
        s, z.clone(), [row(SamplingParams(temperature=0, frequency_penalty=5.0), tokens=(3,), num_prompt=1)]
    )
    assert ids == [3]


def test_logprobs_only_when_asked_and_exact():
    z = logits_rows(2, seed=5)
    ids, lps = sample(
        Sampler(seed=0),
        z.clone(),
        [row(SamplingParams(temperature=0, logprobs=3)), row(SamplingParams(temperature=0))],
    )
    ref = torch.log_softmax(z[0], -1)
    assert lps[1] is None
    lp = lps[0]
    assert lp.token_id == ids[0] and math.isclose(lp.logprob, float(ref[ids[0]]), abs_tol=1e-5)
    top = ref.topk(3)
    assert [t for t, _ in lp.top] == top.indices.tolist()
    assert all(math.isclose(a, float(b), abs_tol=1e-5) for (_, a), b in zip(lp.top, top.values))


def test_only_plain_greedy_rows_skip_the_final_norm_scale():
    """The engine skips the LM head's row scale on a fused step only when every row is an argmax of
    unmodified logits (scale-invariant)."""
    assert not SamplingParams(temperature=0).needs_scaled_logits
    assert not SamplingParams(top_k=1).needs_scaled_logits
    for p in (
        SamplingParams(temperature=0.5),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(temperature=0, repetition_penalty=1.2),
        SamplingParams(temperature=0, logit_bias=((1, 1.0),)),
    ):
        assert p.needs_scaled_logits


@pytest.mark.parametrize(
    "bad",
    [dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(n=0), dict(min_p=2), dict(temperature=math.nan),
     dict(logit_bias=((V + 5, 1.0),))],
)  # fmt: skip
def test_validate_rejects(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).validate(V)
