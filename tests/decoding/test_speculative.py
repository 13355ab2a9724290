"""Verification of drafts: greedy prefix matching, and speculative sampling that keeps head 1's distribution.

The statistical tests are seeded, so they are deterministic; their thresholds (p > 1e-3 to pass,
p < 1e-6 for the negative controls) leave a wide margin either way.
"""

import itertools

import pytest
import torch
from scipy.stats import chisquare

import app.decoding.generate as generate_module
from app.decoding.generate import generate
from app.decoding.sampling import BatchSampling, SamplingParams, logits_to_probs, make_generator
from app.decoding.speculative import accept_drafts, draft_next

CPU = torch.device("cpu")


def sampling_batch(n: int, gen: torch.Generator | None = None, **kw) -> BatchSampling:
    """n sampled rows with the same settings; all draw from one shared generator (cheap for large n)."""
    params = [SamplingParams(do_sample=True, **kw)] * n
    return BatchSampling.from_params(params, [gen or make_generator(0)] * n, CPU)


def greedy_batch(n: int) -> BatchSampling:
    return BatchSampling.from_params([SamplingParams()] * n, [None] * n, CPU)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square goodness of fit; cells of probability 0 must be empty, cells expecting < 5 are pooled."""
    counts, expected = counts.double().flatten(), probs.double().flatten() * counts.sum()
    assert counts[expected == 0].sum() == 0, "a token of probability 0 was emitted"
    small = (expected > 0) & (expected < 5)
    obs = torch.cat([counts[expected >= 5], counts[small].sum()[None]])
    exp = torch.cat([expected[expected >= 5], expected[small].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


# --- accept_drafts, greedy ------------------------------------------------------------------------


def one_hot_logits(argmax: list[list[int]], k: int, V: int) -> torch.Tensor:
    """[B, T, k, V] logits whose every head at offset t peaks at argmax[b][t] (+ head index, for drafting)."""
    B, T = len(argmax), len(argmax[0])
    logits = torch.zeros(B, T, k, V)
    for b, t, j in itertools.product(range(B), range(T), range(k)):
        logits[b, t, j, (argmax[b][t] + j) % V] = 5.0
    return logits


def test_greedy_accepts_the_agreeing_prefix_plus_a_bonus_token():
    k, V = 4, 10
    head1 = [[1, 2, 3, 4], [5, 6, 7, 8], [0, 1, 2, 3], [9, 9, 9, 9]]  # head-1 argmax at offsets 0..3
    logits = one_hot_logits(head1, k, V)
    drafts = torch.tensor([[1, 2, 3], [0, 6, 7], [0, 1, 9], [9, 9, 9]])  # fed at offsets 1..3
    max_accept = torch.tensor([3, 3, 3, 1])
    res = accept_drafts(logits, drafts, None, max_accept, greedy_batch(4), torch.ones(4, dtype=torch.bool))
    assert res.n_emitted.tolist() == [4, 1, 3, 2]  # all agree; first disagrees; third disagrees; capped at 1
    emitted = [res.tokens[b, :n].tolist() for b, n in enumerate(res.n_emitted.tolist())]
    assert emitted == [[1, 2, 3, 4], [5], [0, 1, 2], [9, 9]]
    # next drafts come from heads 2..k at the last kept offset
    last = [3, 0, 2, 1]
    assert res.drafts.tolist() == [[(head1[b][last[b]] + j) % V for j in (1, 2, 3)] for b in range(4)]
    assert res.draft_probs is None
    logp = torch.log_softmax(logits[:, :, 0], dim=-1)
    for b, n in enumerate(res.n_emitted.tolist()):
        want = [float(logp[b, t, emitted[b][t]]) for t in range(n)]
        assert res.logprobs[b, :n].tolist() == pytest.approx(want)


def test_no_drafts_is_plain_decoding():
    logits = one_hot_logits([[3], [7]], 3, 10)
    res = accept_drafts(
        logits,
        torch.zeros(2, 0, dtype=torch.long),
        None,
        torch.zeros(2, dtype=torch.long),
        greedy_batch(2),
        torch.ones(2, dtype=torch.bool),
    )
    assert res.n_emitted.tolist() == [1, 1] and res.tokens[:, 0].tolist() == [3, 7]
    assert res.drafts.tolist() == [[4, 5], [8, 9]]


def test_rows_that_will_not_verify_do_not_draw_drafts():
    gen = make_generator(5)
    before = gen.get_state().clone()
    head_logits = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    bs = sampling_batch(2, gen)
    drafts, q = draft_next(head_logits, bs, torch.zeros(2, dtype=torch.bool))
    assert torch.equal(gen.get_state(), before)
    assert drafts.tolist() == head_logits.argmax(-1).tolist()
    torch.testing.assert_close(q, torch.softmax(head_logits, dim=-1))
    drafts, _ = draft_next(head_logits, bs, torch.ones(2, dtype=torch.bool))
    assert not torch.equal(gen.get_state(), before)


# --- accept_drafts, sampled: one position, crafted p and q ---------------------------------------

P = torch.tensor([0.45, 0.25, 0.15, 0.10, 0.05, 0.0])  # head 1 at offset 0
Q = torch.tensor([0.10, 0.40, 0.0, 0.20, 0.10, 0.20])  # the draft distribution: misses token 2, adds token 5
P_NEXT = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0, 0.0])  # head 1 at offset 1: the bonus after an acceptance


def run_single_position(n: int, draft_dist: torch.Tensor, seed: int = 0):
    """n independent rows: draft one token from draft_dist, verify it against P; returns (drafts, result)."""
    V = len(P)
    gen = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(draft_dist, n, replacement=True, generator=gen)[:, None]  # [n, 1]
    logits = torch.zeros(n, 2, 2, V)
    logits[:, 0, 0] = P.log()
    logits[:, 1, 0] = P_NEXT.log()
    q = Q.expand(n, 1, V).clone()  # the verifier is told the drafts came from Q
    res = accept_drafts(
        logits, drafts, q, torch.ones(n, dtype=torch.long), sampling_batch(n, gen), torch.zeros(n, dtype=torch.bool)
    )
    return drafts[:, 0], res


def test_speculative_sampling_emits_p_whatever_q_drafts():
    n = 20000
    drafts, res = run_single_position(n, Q)
    first = res.tokens[:, 0]
    assert chi2_pvalue(torch.bincount(first, minlength=6), P) > 1e-3
    # acceptance rate is sum(min(p, q)) = 0.6
    accepted = res.n_emitted == 2
    rate = float(accepted.float().mean())
    assert abs(rate - float(torch.minimum(P, Q).sum())) < 4 * (0.6 * 0.4 / n) ** 0.5
    # an accepted draft is emitted as is, then a bonus from head 1 at the next offset
    assert torch.equal(first[accepted], drafts[accepted])
    assert chi2_pvalue(torch.bincount(res.tokens[accepted, 1], minlength=6), P_NEXT) > 1e-3
    # a rejection resamples from norm(max(0, p - q)), which never holds the rejected draft
    residual = (P - Q).clamp(min=0)
    assert chi2_pvalue(torch.bincount(first[~accepted], minlength=6), residual / residual.sum()) > 1e-3
    assert not (first[~accepted] == drafts[~accepted]).any()


def test_single_position_chi_square_has_power():
    """Negative controls: the drafts themselves (accept everything) and a verifier lied to about q."""
    n = 20000
    drafts, _ = run_single_position(n, Q)
    assert chi2_pvalue(torch.bincount(drafts, minlength=6), Q) > 1e-3
    assert chi2_pvalue(torch.bincount(drafts[drafts != 5], minlength=6), P) < 1e-6
    # drafting from a distribution other than the q given to the verifier breaks the guarantee
    _, res = run_single_position(n, torch.tensor([0.5, 0.1, 0.0, 0.1, 0.1, 0.2]))
    assert chi2_pvalue(torch.bincount(res.tokens[:, 0], minlength=6), P) < 1e-6


# --- generate: the joint distribution of the first tokens ----------------------------------------

V_SMALL, K_SMALL = 6, 3
PROMPT = [1, 4, 2]
SETTINGS = [dict(temperature=1.0), dict(temperature=0.7, top_k=4, top_p=0.9)]


@torch.no_grad()
def exact_joint(model, settings: dict, depth: int) -> torch.Tensor:
    """P(x1..xd | prompt) = prod_i p(xi | prompt, x1..x(i-1)), head 1 processed by the settings: [V] * depth.

    Enumerates every prefix x1..x(d-1) and scores it in one uncached forward pass.
    """
    V, L = model.cfg.vocab_size, len(PROMPT)
    prefixes = torch.tensor(list(itertools.product(range(V), repeat=depth - 1)), dtype=torch.long)  # [R, d-1]
    seqs = torch.cat([torch.tensor(PROMPT).expand(len(prefixes), L), prefixes], dim=1)
    head1 = model(seqs)[:, L - 1 :, 0]  # [R, d, V]: next-token logits after the prompt, x1, .., x(d-1)
    probs = logits_to_probs(head1, sampling_batch(len(prefixes), **settings))
    prefix_prob = probs[:, : depth - 1].gather(-1, prefixes[..., None])[..., 0].prod(-1)  # [R]
    return (prefix_prob[:, None] * probs[:, -1]).view([V] * depth)


def sample_tokens(
    model, n: int, settings: dict, depth: int, speculative: bool = True, seed0: int = 0, draft_tokens=None
):
    """The first `depth` tokens [n, depth] of n rows, each with its own seed, from one generate() call.

    One token more than depth is generated, so that no verify pass before token `depth` is capped.
    """
    params = [SamplingParams(do_sample=True, seed=seed0 + i, **settings) for i in range(n)]
    out = generate(model, [PROMPT] * n, depth + 1, params, speculative=speculative, draft_tokens=draft_tokens)
    return torch.tensor([t[:depth] for t in out.tokens])


def joint_counts(tokens: torch.Tensor, V: int) -> torch.Tensor:
    """Counts [V] * d of the rows of tokens [n, d]."""
    flat = torch.zeros(tokens.shape[0], dtype=torch.long)
    for i in range(tokens.shape[1]):
        flat = flat * V + tokens[:, i]
    return torch.bincount(flat, minlength=V ** tokens.shape[1]).view([V] * tokens.shape[1])


@pytest.mark.parametrize("settings", SETTINGS, ids=["t1", "t0.7-topk-topp"])
def test_speculative_sampling_keeps_the_joint_distribution(small_model, settings):
    """x1 comes from the prefill; x2 and x3 are drafts verified in one pass (k - 1 = 2), or resampled."""
    tokens = sample_tokens(small_model, 6000, settings, depth=3)
    assert chi2_pvalue(joint_counts(tokens, V_SMALL), exact_joint(small_model, settings, depth=3)) > 1e-3


def test_speculative_sampling_keeps_the_distribution_of_later_tokens(small_model):
    """Tokens 4 and 5 come from later verify passes, at whatever offsets rows reached by then."""
    settings = SETTINGS[1]
    tokens = sample_tokens(small_model, 6000, settings, depth=5)
    marginal = exact_joint(small_model, settings, depth=5).sum(dim=(0, 1, 2))  # [V, V] over (x4, x5)
    assert chi2_pvalue(joint_counts(tokens[:, 3:], V_SMALL), marginal) > 1e-3


def test_speculative_sampling_with_fewer_drafts_keeps_the_joint_distribution(small_model):
    """One draft per pass (draft_tokens=1 of k - 1 = 2): x2 and x3 are verified in separate passes."""
    settings = SETTINGS[1]
    tokens = sample_tokens(small_model, 6000, settings, depth=3, draft_tokens=1)
    assert chi2_pvalue(joint_counts(tokens, V_SMALL), exact_joint(small_model, settings, depth=3)) > 1e-3


def test_plain_sampling_keeps_the_joint_distribution(small_model):
    """The same check without drafts: the exact distribution the speculative tests compare against is right."""
    settings = SETTINGS[1]
    tokens = sample_tokens(small_model, 6000, settings, depth=3, speculative=False)
    assert chi2_pvalue(joint_counts(tokens, V_SMALL), exact_joint(small_model, settings, depth=3)) > 1e-3


def test_joint_chi_square_rejects_accepting_every_draft(small_model, monkeypatch):
    """Negative control: a verifier that accepts every draft (no min(1, p/q) test) is caught."""

    def accept_everything(logits, drafts, draft_probs, max_accept, bs, want_drafts, *rest):
        shrunk = None if draft_probs is None else draft_probs * 1e-9  # p / q >> 1: every u passes
        return accept_drafts(logits, drafts, shrunk, max_accept, bs, want_drafts, *rest)

    monkeypatch.setattr(generate_module, "accept_drafts", accept_everything)
    settings = SETTINGS[0]
    tokens = sample_tokens(small_model, 6000, settings, depth=3)
    assert chi2_pvalue(joint_counts(tokens, V_SMALL), exact_joint(small_model, settings, depth=3)) < 1e-6


@pytest.mark.parametrize("settings", SETTINGS, ids=["t1", "t0.7-topk-topp"])
def test_small_model_drafts_are_often_rejected(small_model, settings):
    """The distribution tests only mean something if the residual path runs: acceptance is well below 1."""
    params = [SamplingParams(do_sample=True, seed=i, **settings) for i in range(400)]
    stats = generate(small_model, [PROMPT] * 400, 6, params, speculative=True).stats
    assert 0.1 < stats.accepted / stats.drafted < 0.9
    assert min(stats.accepted_by_position) > 0  # second drafts get accepted too
