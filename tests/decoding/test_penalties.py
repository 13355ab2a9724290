"""Frequency, presence and repetition penalties and logit bias: real logits processors, and
speculative decoding with them stays exact (greedy token for token, sampling in distribution).

The references here apply the penalties in plain Python loops over an uncached forward pass,
independently of Penalties.apply.
"""

import itertools

import pytest
import torch

from app.decoding.generate import generate
from app.decoding.sampling import Penalties, SamplingParams
from tests.decoding.test_speculative import (
    PROMPT,
    V_SMALL,
    chi2_pvalue,
    joint_counts,
    sample_tokens,
)

PENALTIES = [
    dict(frequency_penalty=0.8),
    dict(presence_penalty=1.5),
    dict(repetition_penalty=1.8),
    dict(frequency_penalty=0.5, presence_penalty=-0.5, repetition_penalty=1.3, logit_bias=((3, 2.0), (0, -1.0))),
]
IDS = ["frequency", "presence", "repetition", "all+bias"]


def penalized(logits: torch.Tensor, prompt: list[int], generated: list[int], p: SamplingParams) -> torch.Tensor:
    """Head-1 logits [V] after the penalties, by the definitions (OpenAI's and vLLM's)."""
    out = logits.clone().float()
    for tok in range(out.shape[0]):
        n = generated.count(tok)
        if n or tok in prompt:
            out[tok] = out[tok] / p.repetition_penalty if out[tok] > 0 else out[tok] * p.repetition_penalty
        out[tok] -= p.frequency_penalty * n + p.presence_penalty * (n > 0)
    for tok, value in p.logit_bias:
        out[tok] += value
    return out


@torch.no_grad()
def reference_greedy(model, prompt: list[int], n: int, p: SamplingParams) -> list[int]:
    seq: list[int] = []
    for _ in range(n):
        logits = model(torch.tensor([prompt + seq]))[0, -1, 0]
        seq.append(int(penalized(logits, prompt, seq, p).argmax()))
    return seq


@pytest.mark.parametrize("settings", PENALTIES, ids=IDS)
def test_greedy_with_penalties_matches_the_reference_plain_and_speculative(peaked_model, make_prompts, settings):
    model = peaked_model(4)
    prompts = make_prompts(6, model.cfg.vocab_size, 1, 10, seed=3)
    params = SamplingParams(**settings)
    want = [reference_greedy(model, pr, 16, params) for pr in prompts]
    plain = generate(model, prompts, 16, params, speculative=False).tokens
    spec = generate(model, prompts, 16, params, speculative=True)
    assert plain == want
    assert spec.tokens == want
    assert spec.stats.accepted > 0  # drafts were verified against the penalized distribution, not skipped
    assert want != generate(model, prompts, 16, speculative=False).tokens  # the penalties changed the text


def test_penalized_and_plain_rows_share_a_batch(peaked_model, make_prompts):
    model = peaked_model(3)
    prompts = make_prompts(4, model.cfg.vocab_size, 2, 8, seed=5)
    params = [SamplingParams(frequency_penalty=1.0) if i % 2 else SamplingParams() for i in range(4)]
    got = generate(model, prompts, 12, params, speculative=True).tokens
    for pr, p, g in zip(prompts, params, got, strict=True):
        assert g == reference_greedy(model, pr, 12, p)


@pytest.mark.parametrize("penalty", [5e-324, 1e-40, 1e30], ids=["5e-324", "below-float32", "huge"])
def test_extreme_repetition_penalties_sample_without_error(peaked_model, make_prompts, penalty):
    """A repetition penalty far outside float32's range (any positive number is valid input)
    overflows the penalized logits to infinity; sampling takes the limit instead of failing on
    NaN probabilities: below 1 a positive repeated logit wins outright, above 1 repeats vanish."""
    model = peaked_model(3)
    prompts = make_prompts(3, model.cfg.vocab_size, 2, 8, seed=9)
    params = [SamplingParams(do_sample=True, seed=i, repetition_penalty=penalty) for i in range(3)]
    for speculative in (True, False):
        out = generate(model, prompts, 10, params, speculative=speculative)
        assert all(len(t) == 10 and all(0 <= x < model.cfg.vocab_size for x in t) for t in out.tokens)
    greedy = [SamplingParams(repetition_penalty=penalty)] * 3
    assert all(len(t) == 10 for t in generate(model, prompts, 10, greedy, speculative=True).tokens)


@torch.no_grad()
def exact_penalized_joint(model, settings: dict, depth: int) -> torch.Tensor:
    """P(x1..xd | PROMPT) with head 1 penalized by each prefix's own generated tokens: [V] * depth."""
    V = model.cfg.vocab_size
    p = SamplingParams(do_sample=True, **settings)
    joint = torch.zeros([V] * depth, dtype=torch.float64)
    for prefix in itertools.product(range(V), repeat=depth - 1):
        head1 = model(torch.tensor([PROMPT + list(prefix)]))[0, len(PROMPT) - 1 :, 0]  # [depth, V]
        prob = 1.0
        for i in range(depth - 1):
            prob *= float(torch.softmax(penalized(head1[i], PROMPT, list(prefix[:i]), p), -1)[prefix[i]])
        last = torch.softmax(penalized(head1[depth - 1], PROMPT, list(prefix), p), -1).double()
        joint[prefix] = prob * last
    return joint


SAMPLED = dict(frequency_penalty=0.9, presence_penalty=0.4, repetition_penalty=1.5, logit_bias=((2, 1.0),))


@pytest.mark.parametrize("speculative", [True, False], ids=["speculative", "plain"])
def test_sampling_with_penalties_keeps_the_penalized_joint_distribution(small_model, speculative):
    """x2 and x3 are drafts verified in one pass, each against head 1 penalized by the drafts before it."""
    tokens = sample_tokens(small_model, 6000, SAMPLED, depth=3, speculative=speculative)
    exact = exact_penalized_joint(small_model, SAMPLED, depth=3)
    assert chi2_pvalue(joint_counts(tokens, V_SMALL), exact) > 1e-3


def test_the_penalized_chi_square_has_power(small_model):
    """Negative control: samples without the penalties do not fit the penalized distribution."""
    tokens = sample_tokens(small_model, 6000, {}, depth=3)
    assert chi2_pvalue(joint_counts(tokens, V_SMALL), exact_penalized_joint(small_model, SAMPLED, depth=3)) < 1e-6


def test_each_rows_logit_bias_lands_on_its_own_row_and_tokens() -> None:
    """Penalties.build writes every row's bias in one indexed write (it was a Python loop per
    entry): rows with none stay zero, and no row's entries reach another."""
    V = 11
    params = [
        SamplingParams(logit_bias=((3, 2.0), (0, -1.0))),
        SamplingParams(),
        SamplingParams(logit_bias=tuple((t, float(t)) for t in range(V))),
        SamplingParams(logit_bias=((10, -100.0),)),
    ]
    counts = torch.zeros(len(params), V)
    bias = Penalties.build(params, counts, torch.zeros(len(params), V, dtype=torch.bool)).bias
    want = torch.zeros(len(params), V)
    for b, p in enumerate(params):
        for tok, value in p.logit_bias:
            want[b, tok] = value
    assert torch.equal(bias, want)
    assert torch.equal(Penalties.build([SamplingParams()], counts[:1], counts[:1].bool()).bias, torch.zeros(1, V))
