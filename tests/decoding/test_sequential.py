"""Decoding with sequential (DeepSeek-V3) MTP modules: greedy speculative output is plain greedy
output, the modules' cached drafts are the uncached chain's, sampling keeps head 1's joint
distribution, and on a synthetic rule the modules draft what the rule determines."""

import pytest
import torch

import app.decoding.generate as generate_module
from app.decoding.generate import generate
from app.decoding.predict import score_next
from app.decoding.sampling import SamplingParams
from app.decoding.speculative import accept_drafts
from app.model.model import MTPTransformer
from tests.decoding.test_speculative import PROMPT, SETTINGS, chi2_pvalue, exact_joint, joint_counts, sample_tokens
from tests.training.test_sequential import BLOCK, T, rule_stream, train_on_rule


def seq_model(random_model, k: int = 3, **overrides):
    return random_model(seed=k, scale=0.15, k=k, head_type="sequential", **overrides)


@torch.no_grad()
def uncached_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Reference: head 1's argmax, recomputing the whole sequence each token (no cache, no drafts)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model.head.proj(model.trunk(torch.tensor([seq]))[0, -1]).argmax()))
    return seq[len(prompt) :]


def record_steps(monkeypatch) -> list:
    """(max_accept, result) of every accept_drafts call of a generate() call, in order (the first
    is the prefill's)."""
    results = []

    def recording(*args, **kwargs):
        res = accept_drafts(*args, **kwargs)
        results.append((args[3], res))
        return res

    monkeypatch.setattr(generate_module, "accept_drafts", recording)
    return results


# --- greedy --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "norm"), [(2, "post"), (3, "post"), (4, "post"), (4, "pre")])
def test_greedy_speculative_matches_plain_greedy(random_model, make_prompts, k, norm):
    model = seq_model(random_model, k, norm_position=norm)
    prompts = [*make_prompts(6, 16, 1, 12, seed=k), [3]]  # ragged, one prompt shorter than k - 1
    spec = generate(model, prompts, 20, speculative=True)
    plain = generate(model, prompts, 20, speculative=False)
    assert spec.tokens == plain.tokens
    assert spec.stats.drafted > 0
    for prompt, out in zip(prompts, spec.tokens, strict=True):
        assert out == uncached_greedy(model, prompt, 20)


def test_greedy_speculative_matches_plain_greedy_on_a_bfloat16_cache(random_model, make_prompts, monkeypatch):
    """Keys and values kept in bfloat16 (the engine's compiled CPU default), the modules'
    caches too: speculative greedy still gives plain greedy's tokens, token for token."""
    model = seq_model(random_model, 3)
    model.kv_dtype = torch.bfloat16
    dtypes = set()
    setup = model.setup_caches

    def recorded(*args, **kwargs):
        setup(*args, **kwargs)
        dtypes.update(c.k_cache.dtype for c in model.kv_caches() if c is not None)

    monkeypatch.setattr(model, "setup_caches", recorded)
    prompts = make_prompts(6, 16, 1, 12, seed=7)
    spec = generate(model, prompts, 20, speculative=True)
    assert dtypes == {torch.bfloat16}  # every layer's and module's
    plain = generate(model, prompts, 20, speculative=False)
    assert spec.tokens == plain.tokens
    assert spec.stats.accepted > 0


@pytest.mark.parametrize(("k", "draft_tokens"), [(3, None), (4, None), (4, 1), (4, 2)])
def test_cached_drafts_are_the_uncached_chain(random_model, make_prompts, monkeypatch, k, draft_tokens):
    """After every step, row b's drafts are what the modules give, uncached, on its tokens so far:
    predict_proba's greedy chain at the position before the bonus (head 1's argmax is the bonus).
    So each module's cache holds the true tokens' entries wherever a rejected draft had written."""
    model = seq_model(random_model, k)
    prompts = make_prompts(5, 16, 1, 10, seed=10 + k)
    steps = record_steps(monkeypatch)
    n_new = 16
    out = generate(model, prompts, n_new, speculative=True, draft_tokens=draft_tokens)
    n = k - 1 if draft_tokens is None else draft_tokens
    emitted: list[list[int]] = [[] for _ in prompts]
    checked = rejected = 0
    for _, res in steps:
        for b, prompt in enumerate(prompts):
            if len(emitted[b]) >= n_new:
                continue  # finished: its row keeps running, but nothing reads it
            emitted[b] += res.tokens[b, : int(res.n_emitted[b])].tolist()
            if len(emitted[b]) >= n_new:
                continue
            seq = torch.tensor([prompt + emitted[b][:-1]])  # up to the position before the bonus
            chain = model.predict_proba(seq)[0].argmax(-1).tolist()  # [bonus, draft 1, .., draft k-1]
            assert chain[0] == emitted[b][-1]
            assert res.drafts[b, :n].tolist() == chain[1 : n + 1]
            checked += 1
            rejected += int(res.n_emitted[b]) < n + 1
    assert [o[:n_new] for o in emitted] == out.tokens
    assert checked > 40 and rejected > 10  # rejected drafts were overwritten along the way


def test_penalized_greedy_speculative_matches_plain(random_model, make_prompts):
    model = seq_model(random_model, 3)
    prompts = make_prompts(4, 16, 2, 9, seed=3)
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.3),
        SamplingParams(logit_bias=((5, 2.0),)),
        SamplingParams(),
    ]
    spec = generate(model, prompts, 16, params, speculative=True)
    assert spec.tokens == generate(model, prompts, 16, params, speculative=False).tokens


# --- sampled -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_seq_model(random_model):
    return random_model(
        seed=1, scale=0.25, vocab_size=6, k=3, d_model=16, d_ff=32, max_seq_len=16, head_type="sequential"
    )


@pytest.mark.parametrize("settings", SETTINGS, ids=["t1", "t0.7-topk-topp"])
def test_speculative_sampling_keeps_the_joint_distribution(small_seq_model, settings):
    """x1 from the prefill; x2, x3 drafted by modules 1 and 2 and verified in one pass, or resampled."""
    tokens = sample_tokens(small_seq_model, 6000, settings, depth=3)
    assert chi2_pvalue(joint_counts(tokens, 6), exact_joint(small_seq_model, settings, depth=3)) > 1e-3


def test_speculative_sampling_keeps_the_distribution_of_later_tokens(small_seq_model):
    settings = SETTINGS[1]
    tokens = sample_tokens(small_seq_model, 6000, settings, depth=5)
    marginal = exact_joint(small_seq_model, settings, depth=5).sum(dim=(0, 1, 2))  # [V, V] over (x4, x5)
    assert chi2_pvalue(joint_counts(tokens[:, 3:], 6), marginal) > 1e-3


def test_joint_chi_square_rejects_accepting_every_draft(small_seq_model, monkeypatch):
    """Negative control: a verifier that accepts every module draft is caught."""

    def accept_everything(logits, drafts, draft_probs, max_accept, bs, want_drafts, *rest):
        shrunk = None if draft_probs is None else draft_probs * 1e-9  # p / q >> 1: every u passes
        return accept_drafts(logits, drafts, shrunk, max_accept, bs, want_drafts, *rest)

    monkeypatch.setattr(generate_module, "accept_drafts", accept_everything)
    tokens = sample_tokens(small_seq_model, 6000, SETTINGS[0], depth=3)
    assert chi2_pvalue(joint_counts(tokens, 6), exact_joint(small_seq_model, SETTINGS[0], depth=3)) < 1e-6


def test_small_model_module_drafts_are_often_rejected(small_seq_model):
    """The distribution tests only mean something if both paths run: some drafts accepted, many not."""
    params = [SamplingParams(do_sample=True, seed=i, **SETTINGS[0]) for i in range(400)]
    stats = generate(small_seq_model, [PROMPT] * 400, 6, params, speculative=True).stats
    assert 0.1 < stats.accepted / stats.drafted < 0.9
    assert min(stats.accepted_by_position) > 0


def test_a_seeded_row_does_not_depend_on_its_batch(random_model, make_prompts):
    model = seq_model(random_model, 3)
    prompts = make_prompts(4, 16, 1, 10, seed=5)
    params = [SamplingParams(do_sample=True, temperature=0.9, seed=s) for s in (11, 12, 13, 14)]
    together = generate(model, prompts, 12, params, speculative=True).tokens
    for b in range(4):
        assert generate(model, [prompts[b]], 12, [params[b]], speculative=True).tokens[0] == together[b]


# --- a synthetic rule: each token determines the next three --------------------------------------


def determined_acceptance(model: MTPTransformer, monkeypatch) -> tuple[float, float]:
    """Greedy generate() from block-aligned prompts: (acceptance of the verified drafts whose target
    the rule determines, counted while the drafts before them were accepted; all drafts' acceptance)."""
    steps = record_steps(monkeypatch)
    stream, L = rule_stream(300, seed=5), 3 * BLOCK
    prompts = [stream[s : s + L].tolist() for s in range(0, 64 * 4 * BLOCK, 4 * BLOCK)]
    out = generate(model, prompts, T - L, speculative=True)
    pos = torch.full((len(prompts),), L)  # position of each row's last emitted token
    judged = accepted = 0
    for max_accept, res in steps[1:]:
        n_acc = res.n_emitted - 1
        for b in range(len(prompts)):
            for t in range(1, min(int(max_accept[b]), int(n_acc[b]) + 1) + 1):  # verified, up to the first rejection
                if (int(pos[b]) + t) % BLOCK:  # not a block's random first token
                    judged += 1
                    accepted += t <= int(n_acc[b])
        pos += res.n_emitted
    monkeypatch.undo()
    return accepted / judged, out.stats.accepted / out.stats.drafted


def test_sequential_modules_draft_a_rule_the_linear_head_cannot(monkeypatch):
    """Module j reads the token before its target, so it drafts every determined token (measured:
    1.00 with 200 training steps or 250, all drafts 0.63-0.65, as a block's random token is only
    guessed); linear head j + 1 sees only the state before the bonus and misses whenever the
    bonus is a block's random token (measured 0.66-0.69)."""
    seq_rate, seq_all = determined_acceptance(train_on_rule("sequential", steps=200, block_aligned=True), monkeypatch)
    lin_rate, lin_all = determined_acceptance(train_on_rule("linear", steps=200, block_aligned=True), monkeypatch)
    assert seq_rate >= 0.95, (seq_rate, seq_all)
    assert lin_rate < 0.8 and seq_rate - lin_rate > 0.2, (lin_rate, lin_all)


# --- /predict ------------------------------------------------------------------------------------


def test_predict_chains_on_greedy_tokens_and_scores_candidates_on_their_own(random_model, make_prompts):
    model = seq_model(random_model, 3)
    prompts = make_prompts(3, 16, 1, 9, seed=7)
    cands = [[[1, 2, 3], [4]], [[5, 5]], [[0, 9, 2], [6, 1]]]
    scores = score_next(model, prompts, top_n=16, candidates=cands)
    for b, prompt in enumerate(prompts):
        L = len(prompt)
        greedy = scores.greedy[b]
        with torch.no_grad():  # teacher-forced: depth j at L - 1 reads the continuation's tokens 1..j
            ref = torch.log_softmax(model(torch.tensor([prompt + greedy]))[0, L - 1], dim=-1)  # [k, V]
        assert greedy == ref.argmax(-1).tolist()
        got = torch.zeros(3, 16).scatter_(-1, torch.tensor(scores.top_ids[b]), torch.tensor(scores.top_logprobs[b]))
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        for cand, lps in zip(cands[b], scores.candidates[b], strict=True):
            with torch.no_grad():
                ref = torch.log_softmax(model(torch.tensor([prompt + cand]))[0, L - 1], dim=-1)
            want = [float(ref[j, t]) for j, t in enumerate(cand)]
            assert lps == pytest.approx(want, abs=1e-5)
    # a candidate's later scores depend on its own earlier tokens: a chain, not per-head marginals
    two = score_next(model, [prompts[0]], top_n=1, candidates=[[[1, 2], [3, 2]]]).candidates[0]
    assert two[0][1] != pytest.approx(two[1][1], abs=1e-4)


def test_candidates_share_their_prompts_positions_and_score_as_the_teacher_forced_chain(random_model):
    """Candidates of every length on prompts shorter and longer than k - 1 (depth j's window of
    the prompt's last positions starts before position 0 for a prompt shorter than j), many per
    prompt: each score is the teacher-forced chain's; the caches the model had set (a serving
    engine's) are back afterwards, untouched."""
    model = seq_model(random_model, 4)
    gen = torch.Generator().manual_seed(5)
    prompts = [[3], [7, 1], [2, 9, 4], torch.randint(0, 16, (13,), generator=gen).tolist()]
    cands = [[torch.randint(0, 16, (m,), generator=gen).tolist() for m in (4, 1, 3, 2, 4, 4)] for _ in prompts]
    model.setup_caches(2)
    before = [(c.k_cache.clone(), c.v_cache.clone()) for c in model.kv_caches() if c is not None]
    caches = model.kv_caches()
    scores = score_next(model, prompts, top_n=1, candidates=cands)
    assert model.kv_caches() == caches
    for c, (k, v) in zip(model.kv_caches(), before, strict=True):
        assert c is not None and torch.equal(c.k_cache, k) and torch.equal(c.v_cache, v)
    for prompt, cs, got in zip(prompts, cands, scores.candidates, strict=True):
        for cand, lps in zip(cs, got, strict=True):
            with torch.no_grad():
                ref = torch.log_softmax(model(torch.tensor([prompt + cand]))[0, len(prompt) - 1], dim=-1)
            assert lps == pytest.approx([float(ref[j, t]) for j, t in enumerate(cand)], abs=1e-5)
