"""Logits processing (temperature, top-k, top-p), per-row seeded sampling, and batch independence."""

import dataclasses
import math

import pytest
import torch

from app.decoding.generate import generate
from app.decoding.sampling import BatchSampling, SamplingParams, logits_to_probs, make_generator, sample_rows


def batch(*params: SamplingParams) -> BatchSampling:
    gens = [None if p.greedy else make_generator(p.seed) for p in params]
    return BatchSampling.from_params(list(params), gens, torch.device("cpu"))


def sampled(**kw) -> SamplingParams:
    return SamplingParams(do_sample=True, **kw)


def log(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()


# --- logits_to_probs ----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_divides_the_logits(temperature):
    logits = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(0))
    probs = logits_to_probs(logits, batch(*[sampled(temperature=temperature)] * 2))
    torch.testing.assert_close(probs, torch.softmax(logits / temperature, dim=-1))


def test_greedy_rows_ignore_temperature_and_keep_their_argmax():
    logits = torch.randn(2, 10, generator=torch.Generator().manual_seed(1))
    bs = batch(SamplingParams(temperature=0.3, do_sample=False), sampled(temperature=0.0, top_k=3))
    assert bs.greedy.tolist() == [True, True] and bs.all_greedy
    probs = logits_to_probs(logits, bs)
    torch.testing.assert_close(probs[0], torch.softmax(logits[0], dim=-1))
    assert probs[1].argmax() == logits[1].argmax()


def test_a_batch_knows_its_greedy_rows_as_python_bools_too():
    mixed = batch(SamplingParams(do_sample=False), sampled(temperature=0.7))
    assert mixed.greedy.tolist() == mixed.greedy_rows == [True, False] and not mixed.all_greedy
    built = dataclasses.replace(mixed, greedy=torch.tensor([True, True]))
    assert built.greedy_rows == [True, True] and built.all_greedy  # derived from the tensor


@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_top_k_keeps_exactly_the_k_most_likely_tokens(top_k):
    logits = torch.randn(1, 4, 12, generator=torch.Generator().manual_seed(2))
    probs = logits_to_probs(logits, batch(sampled(top_k=top_k)))
    for row_logits, row_probs in zip(logits[0], probs[0]):
        kept = row_logits.topk(top_k).indices
        assert set(row_probs.nonzero()[:, 0].tolist()) == set(kept.tolist())
        torch.testing.assert_close(row_probs[kept], torch.softmax(row_logits[kept], dim=-1))


def test_top_k_larger_than_vocab_keeps_everything():
    logits = torch.randn(1, 5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits_to_probs(logits, batch(sampled(top_k=50))), torch.softmax(logits, dim=-1))


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.05, 1), (0.39, 1), (0.41, 2), (0.69, 2), (0.71, 3), (0.89, 3), (0.91, 4), (1.0, 5)],
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    p = [0.4, 0.3, 0.06, 0.2, 0.04]  # sorted: 0.4, 0.3, 0.2, 0.06, 0.04; prefix sums 0.4, 0.7, 0.9, 0.96, 1
    probs = logits_to_probs(log(p)[None], batch(sampled(top_p=top_p)))[0]
    order = sorted(range(5), key=lambda i: -p[i])
    want = torch.zeros(5)
    want[order[:kept]] = torch.tensor(p)[order[:kept]]
    torch.testing.assert_close(probs, want / want.sum())


def test_top_p_applies_after_temperature_and_top_k():
    logits = log([0.5, 0.25, 0.15, 0.1])[None]
    # temperature 2 flattens to ~[.37, .26, .20, .17]; top_k 3 renormalises to ~[.44, .31, .24]; top_p 0.7 keeps 2
    probs = logits_to_probs(logits, batch(sampled(temperature=2.0, top_k=3, top_p=0.7)))[0]
    w = torch.tensor([0.5, 0.25]).sqrt()
    torch.testing.assert_close(probs, torch.cat([w / w.sum(), torch.zeros(2)]))


def test_each_row_uses_its_own_settings():
    logits = torch.randn(4, 2, 9, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(), sampled(top_k=2), sampled(top_p=0.5, temperature=0.7), sampled(temperature=1.5)]
    together = logits_to_probs(logits, batch(*params))
    for row, p in enumerate(params):
        torch.testing.assert_close(together[row], logits_to_probs(logits[row : row + 1], batch(p))[0])


def test_processed_distributions_sum_to_one():
    logits = 5 * torch.randn(3, 4, 20, generator=torch.Generator().manual_seed(5))
    bs = batch(sampled(top_k=4, top_p=0.8), sampled(temperature=0.2, top_p=0.3), sampled(temperature=3.0))
    torch.testing.assert_close(logits_to_probs(logits, bs).sum(-1), torch.ones(3, 4))


# --- sample_rows ---------------------------------------------------------------------------------


def test_greedy_rows_take_the_argmax_and_sampled_rows_stay_in_the_support():
    logits = torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(6))
    bs = batch(SamplingParams(), sampled(top_k=2, seed=0))
    probs = logits_to_probs(logits, bs)
    tokens = sample_rows(probs, bs)  # [2, 50]
    assert tokens[0].tolist() == logits[0].argmax(-1).tolist()
    assert (probs[1].gather(-1, tokens[1][:, None]) > 0).all()
    assert len(set(tokens[1].tolist())) > 2  # it does sample: not always the argmax


def test_sampled_frequencies_follow_the_probabilities():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    bs = batch(sampled(seed=7))
    n = 4000
    tokens = sample_rows(p.expand(1, n, 4).clone(), bs)[0]
    counts = torch.bincount(tokens, minlength=4).float()
    sd = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() < 4 * sd).all(), counts


# --- seeds and batch independence, through generate ---------------------------------------------


def test_make_generator_is_reproducible_for_a_seed_and_random_without():
    assert torch.rand(5, generator=make_generator(3)).tolist() == torch.rand(5, generator=make_generator(3)).tolist()
    assert make_generator(None).initial_seed() != make_generator(None).initial_seed()


@pytest.mark.parametrize("speculative", [True, False])
def test_same_seed_same_tokens_and_different_seed_different_tokens(random_model, speculative):
    model = random_model(scale=0.3)
    prompt = [[1, 2, 3]]
    n = 40

    def run(seed):
        return generate(model, prompt, n, sampled(seed=seed), speculative=speculative).tokens[0]

    first = run(11)
    assert run(11) == first
    assert run(12) != first
    # the sampled text is not just the greedy continuation
    assert first != generate(model, prompt, n, speculative=speculative).tokens[0]


@pytest.mark.parametrize("speculative", [True, False])
@pytest.mark.parametrize("trained", [True, False], ids=["peaked", "random"])
def test_a_rows_samples_do_not_depend_on_its_batch(peaked_model, random_model, make_prompts, trained, speculative):
    """Rows progress at different speeds (the peaked model accepts often, the random one samples widely)."""
    model = peaked_model(3) if trained else random_model(scale=0.3)
    prompts = make_prompts(10, model.cfg.vocab_size, 1, 12, seed=13)
    params = [
        sampled(seed=1),
        sampled(seed=2, temperature=0.7, top_k=5),
        SamplingParams(),
        sampled(seed=3, top_p=0.8),
        sampled(seed=1, temperature=1.3),
        sampled(seed=4, temperature=0.0),
        sampled(seed=5, temperature=0.5),
        sampled(seed=6, top_k=2),
        sampled(seed=7, temperature=1.2, top_p=0.9),
        sampled(seed=8),
    ]
    n = 32
    together = generate(model, prompts, n, params, speculative=speculative)
    for row, (prompt, p) in enumerate(zip(prompts, params)):
        assert together.tokens[row] == generate(model, [prompt], n, p, speculative=speculative).tokens[0], row
    # and a different batch order does not change them either
    flipped = generate(model, prompts[::-1], n, params[::-1], speculative=speculative)
    assert flipped.tokens == together.tokens[::-1]
    if speculative:
        assert together.stats.accepted > 0


def test_speculative_sampling_logprobs_are_head_one_log_softmax(random_model):
    model = random_model(scale=0.3)
    prompt = [4, 1]
    out = generate(model, [prompt], 12, sampled(seed=5, temperature=0.8, top_k=6), speculative=True)
    seq = torch.tensor([prompt + out.tokens[0]])
    logp = torch.log_softmax(model(seq)[0, len(prompt) - 1 : -1, 0], dim=-1)
    want = logp.gather(-1, seq[0, len(prompt) :, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs[0]), want, atol=1e-4, rtol=0)
    assert all(math.isfinite(v) and v <= 0 for v in out.logprobs[0])


def test_typical_p_keeps_the_tokens_nearest_the_entropy_until_their_mass_suffices():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    entropy = float(-(probs * probs.log()).sum())
    order = (-probs.log() - entropy).abs().argsort().tolist()  # most typical first
    sampling = BatchSampling.from_params([SamplingParams(do_sample=True, typical_p=0.3)], [None], torch.device("cpu"))
    out = logits_to_probs(probs.log()[None, None], sampling)[0, 0]
    kept, mass = [], 0.0
    for i in order:  # by the definition: add tokens until the mass reaches 0.3
        kept.append(i)
        mass += float(probs[i])
        if mass >= 0.3:
            break
    assert sorted(torch.nonzero(out).flatten().tolist()) == sorted(kept)
    assert torch.allclose(out[kept], probs[kept] / probs[kept].sum())
    assert 0 not in kept  # here the most likely token is not typical: greedy rows never use typical_p
    greedy = BatchSampling.from_params([SamplingParams(typical_p=0.3)], [None], torch.device("cpu"))
    assert int(logits_to_probs(probs.log()[None, None], greedy)[0, 0].argmax()) == 0
