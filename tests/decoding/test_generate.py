"""generate(): greedy self-speculative decoding equals plain greedy decoding, batched or not; stats; EOS.

Greedy parity runs on briefly trained models (so drafts are often, but not always, accepted);
the exact accept/reject bookkeeping runs on stub models whose heads follow a crafted rule.
"""

import copy
import math
import shutil

import pytest
import torch

from app.decoding import generate as generate_module
from app.decoding.compiled import CompiledDecoder
from app.decoding.generate import generate, prefill, prompt_logprobs
from app.decoding.sampling import SamplingParams

N_NEW = 20
TIE = 1e-5  # a top-2 logit gap below this is a float tie, where cached/uncached kernels may disagree


@torch.no_grad()
def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy decoding with no KV cache: re-run the whole sequence for every token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1, 0].argmax()))
    return seq[len(prompt) :]


@torch.no_grad()
def assert_same_tokens(model, prompts, got: list[list[int]], want: list[list[int]], label: str) -> None:
    """Token-for-token equality; a divergence reports the top-2 logit gap there (a tie or a bug)."""
    for row, (prompt, g, w) in enumerate(zip(prompts, got, want, strict=True)):
        if g == w:
            continue
        i = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
        logits = model(torch.tensor([prompt + w[:i]], device=model.head.proj.weight.device))[0, -1, 0]
        top2 = logits.topk(2).values
        gap = float(top2[0] - top2[1])
        kind = "a float tie" if gap < TIE else "NOT a tie: a bug"
        pytest.fail(
            f"{label}: row {row} (prompt {prompt}) diverges at token {i}: {g} vs {w}; top-2 gap {gap:.2e}, {kind}"
        )


# --- greedy parity on trained models ---------------------------------------------------------


@pytest.mark.parametrize("positional_encoding", ["sinusoidal", "learned"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_greedy_speculative_matches_plain_greedy(peaked_model, make_prompts, k, positional_encoding):
    model = peaked_model(k, positional_encoding)
    prompts = make_prompts(32, model.cfg.vocab_size, 1, 12, seed=k)
    reference = [reference_greedy(model, p, N_NEW) for p in prompts]

    spec_batched = generate(model, prompts, N_NEW, speculative=True)
    plain_batched = generate(model, prompts, N_NEW, speculative=False)
    spec_single = [generate(model, [p], N_NEW, speculative=True).tokens[0] for p in prompts]
    plain_single = [generate(model, [p], N_NEW, speculative=False).tokens[0] for p in prompts]

    assert_same_tokens(model, prompts, plain_single, reference, "plain, one at a time")
    assert_same_tokens(model, prompts, plain_batched.tokens, reference, "plain, batched")
    assert_same_tokens(model, prompts, spec_single, reference, "speculative, one at a time")
    assert_same_tokens(model, prompts, spec_batched.tokens, reference, "speculative, batched")
    # the run exercised both accepted and rejected drafts
    stats = spec_batched.stats
    assert 0 < stats.accepted < stats.drafted
    assert stats.forward_passes < plain_batched.stats.forward_passes == N_NEW


@pytest.mark.parametrize("draft_tokens", [0, 1, 2])
def test_greedy_speculative_with_fewer_drafts_matches_plain_greedy(peaked_model, make_prompts, draft_tokens):
    model = peaked_model(4, "sinusoidal")
    prompts = make_prompts(16, model.cfg.vocab_size, 1, 12, seed=5)
    plain = generate(model, prompts, N_NEW, speculative=False)
    spec = generate(model, prompts, N_NEW, speculative=True, draft_tokens=draft_tokens)
    assert_same_tokens(model, prompts, spec.tokens, plain.tokens, f"{draft_tokens} drafts per pass")
    st = spec.stats
    assert st.drafted <= draft_tokens * st.verify_steps and len(st.accepted_by_position) == 3
    assert st.accepted_by_position[draft_tokens:] == [0] * (3 - draft_tokens)  # heads past the cap never verify
    assert (st.forward_passes < plain.stats.forward_passes) == (draft_tokens > 0)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("autotune", [False, True])
def test_compiled_decoder_gives_the_eager_greedy_tokens(peaked_model, make_prompts, autotune):
    """torch.compile'd steps (static shapes: the whole cache attended under the position mask)
    emit the eager tokens, log-probabilities and drafts (the same acceptance at every draft
    position), plain and speculative, on a batch of prompts of different lengths; also with
    every matmul autotuned (Inductor's C++ GEMM template)."""
    model = copy.deepcopy(peaked_model(3))  # the decoder keeps caches on its model
    prompts = make_prompts(4, model.cfg.vocab_size, 1, 12, seed=11)
    want_gen = generate(model, prompts, N_NEW, speculative=False)
    want = want_gen.tokens
    dec = CompiledDecoder(model, len(prompts), autotune=autotune)
    plain = generate(model, prompts, N_NEW, speculative=False, compiled=dec)
    spec = generate(model, prompts, N_NEW, speculative=True, compiled=dec)
    assert_same_tokens(model, prompts, plain.tokens, want, "compiled plain")
    assert_same_tokens(model, prompts, spec.tokens, want, "compiled speculative")
    assert 0 < spec.stats.accepted < spec.stats.drafted
    eager_spec = generate(model, prompts, N_NEW, speculative=True)
    for got, ref in ((plain, want_gen), (spec, eager_spec)):  # the fused greedy step's log-probabilities
        for row in range(len(prompts)):
            got_lp, ref_lp = torch.tensor(got.logprobs[row]), torch.tensor(ref.logprobs[row])
            torch.testing.assert_close(got_lp, ref_lp, atol=1e-4, rtol=0)
    assert spec.stats.accepted_by_position == eager_spec.stats.accepted_by_position
    sampled = [SamplingParams(do_sample=True, temperature=0.9, seed=s) for s in range(len(prompts))]
    assert (  # sampled rows take the general path: the same seeded tokens as eager
        generate(model, prompts, N_NEW, sampled, compiled=dec).tokens == generate(model, prompts, N_NEW, sampled).tokens
    )
    generate(model, prompts[:1], 3)  # an eager run in between replaces the model's caches
    again = generate(model, prompts, N_NEW, speculative=True, compiled=dec)
    assert_same_tokens(model, prompts, again.tokens, want, "compiled after an eager run")
    with pytest.raises(ValueError, match="at most 4 rows"):
        generate(model, prompts * 2, 2, compiled=dec)


@pytest.mark.parametrize("k", [2, 4])
def test_greedy_speculative_logprobs_match_plain(peaked_model, make_prompts, k):
    model = peaked_model(k)
    prompts = make_prompts(12, model.cfg.vocab_size, 1, 10, seed=40 + k)
    spec = generate(model, prompts, N_NEW, speculative=True)
    plain = generate(model, prompts, N_NEW, speculative=False)
    assert spec.tokens == plain.tokens
    for row, prompt in enumerate(prompts):
        seq = torch.tensor([prompt + plain.tokens[row]])
        logp = torch.log_softmax(model(seq)[0, len(prompt) - 1 : -1, 0], dim=-1)  # [N_NEW, V]
        want = logp.gather(-1, seq[0, len(prompt) :, None])[:, 0]
        torch.testing.assert_close(torch.tensor(spec.logprobs[row]), want, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(plain.logprobs[row]), want, atol=1e-4, rtol=0)


def test_batch_filling_the_context_window_matches_one_at_a_time(peaked_model, make_prompts):
    """The longest prompt plus max_new_tokens exactly fills max_seq_len, while shorter rows run on."""
    model = peaked_model(4)
    prompts = [*make_prompts(10, model.cfg.vocab_size, 2, 9, seed=3), [1] * 10]
    n = model.cfg.max_seq_len - 10
    spec = generate(model, prompts, n, speculative=True)
    plain = [generate(model, [p], n, speculative=False).tokens[0] for p in prompts]
    assert_same_tokens(model, prompts, spec.tokens, plain, "speculative, batched, full context")
    assert all(len(t) == n for t in spec.tokens)


def test_mixed_greedy_and_sampled_batch_keeps_greedy_rows_exact(peaked_model, make_prompts):
    model = peaked_model(3)
    prompts = make_prompts(6, model.cfg.vocab_size, 1, 10, seed=8)
    params = [SamplingParams() if i % 2 == 0 else SamplingParams(do_sample=True, seed=i) for i in range(6)]
    mixed = generate(model, prompts, N_NEW, params, speculative=True)
    for row in range(0, 6, 2):
        assert mixed.tokens[row] == reference_greedy(model, prompts[row], N_NEW)


# --- stub models: always accept, never accept, mixed --------------------------------------------


def follow_token(x, pos, j):
    """Always accept: head j predicts x + j, which is what head 1 gives j - 1 steps later."""
    return x + j


def never_follow(x, pos, j):
    """Never accept (vocab 12): head 1 cycles through 0..10; heads 2..k always draft 11."""
    return (x + 1) % 11 if j == 1 else torch.full_like(x, 11)


def f(p):
    return p * p + 3 * p + 1


def by_position(x, pos, j):
    """Position-driven, mixed acceptance: the token at position p is f(p); heads 2..k draft
    f(p + j) correctly only when p % 3 != 0, so rows of different lengths accept differently."""
    right = f(pos + j)
    return right if j == 1 else torch.where(pos % 3 == 0, right + 1, right)


@pytest.mark.parametrize("n", [21, 10, 2])
def test_always_accept_emits_k_tokens_per_verify_pass(stub_model, n):
    k = 4
    model = stub_model(follow_token, k=k)
    prompts = [[3, 5], [7], [0, 0, 11]]
    spec = generate(model, prompts, n, speculative=True)
    verify_passes = math.ceil((n - 1) / k)
    assert model.fed[1:] == [k] * verify_passes  # after the prefill, every pass carried k - 1 drafts
    assert spec.stats.forward_passes == 1 + verify_passes
    plain = generate(model, prompts, n, speculative=False)
    want = [[(p[-1] + i) % 12 for i in range(1, n + 1)] for p in prompts]
    assert spec.tokens == plain.tokens == want
    assert plain.stats.forward_passes == n
    if (n - 1) % k == 0:
        assert spec.stats.mean_accepted_length == k
        assert spec.stats.accepted_by_position == [len(prompts) * verify_passes] * (k - 1)
    assert spec.stats.accepted == spec.stats.drafted


@pytest.mark.parametrize("k", [2, 4])
def test_never_accept_emits_one_token_per_pass(stub_model, k):
    n = 9
    model = stub_model(never_follow, k=k)
    prompts = [[3, 5], [10], [0, 0, 4]]
    spec = generate(model, prompts, n, speculative=True)
    plain = generate(model, prompts, n, speculative=False)
    want = [[(p[-1] + i) % 11 for i in range(1, n + 1)] for p in prompts]
    assert spec.tokens == plain.tokens == want
    assert spec.stats.forward_passes == plain.stats.forward_passes == n
    assert spec.stats.accepted == 0 and spec.stats.accepted_by_position == [0] * (k - 1)
    assert spec.stats.mean_accepted_length == 1.0
    assert spec.stats.verify_steps == len(prompts) * (n - 2)  # the last pass has no room for a draft
    assert spec.stats.drafted == len(prompts) * sum(min(r - 1, k - 1) for r in range(2, n))


def test_rows_accepting_different_amounts_get_their_own_tokens(stub_model):
    model = stub_model(by_position, k=4, vocab_size=97)
    prompts = [[1], [1, 2], [5, 5, 5], [0] * 7, [4] * 12]
    n = 25
    batched = generate(model, prompts, n, speculative=True)
    want = [[f(len(p) + i) % 97 for i in range(n)] for p in prompts]
    assert batched.tokens == want
    assert [generate(model, [p], n, speculative=True).tokens[0] for p in prompts] == want
    assert 0 < batched.stats.accepted < batched.stats.drafted


def test_row_that_finishes_early_stops_at_max_new_tokens(stub_model):
    """Row 0 accepts every draft and reaches max_new_tokens in few passes; row 1 never does."""

    def rule(x, pos, j):  # tokens < 20 follow x + j (all accepted); tokens >= 20 never accept
        live = (x + j) % 20
        stalled = 20 + (x - 20 + 1) % 10 if j == 1 else torch.full_like(x, 5)
        return torch.where(x < 20, live, stalled)

    model = stub_model(rule, k=4, vocab_size=30)
    spec = generate(model, [[2], [25, 21]], 13, speculative=True)
    assert spec.tokens[0] == [(2 + i) % 20 for i in range(1, 14)]
    assert spec.tokens[1] == [20 + (21 - 20 + i) % 10 for i in range(1, 14)]
    assert spec.stats.forward_passes == 13  # row 1 decodes one token per pass; row 0 was done after 4
    assert spec.tokens == generate(model, [[2], [25, 21]], 13, speculative=False).tokens


# --- EOS and limits ----------------------------------------------------------------------------


@pytest.mark.parametrize("speculative", [True, False])
def test_row_stops_at_eos_inside_an_accepted_block(stub_model, speculative):
    model = stub_model(follow_token, k=4)
    # row 0: 2, then the block 3 4 5 6, then 7 (EOS) first in the next block; row 1 never meets 7
    out = generate(model, [[1], [8, 8]], 10, speculative=speculative, eos_id=7)
    assert out.tokens == [[2, 3, 4, 5, 6, 7], [9, 10, 11, 0, 1, 2, 3, 4, 5, 6]]
    assert out.finished_by_eos == [True, False]
    assert [len(lp) for lp in out.logprobs] == [6, 10]


@pytest.mark.parametrize("speculative", [True, False])
def test_eos_truncates_the_same_greedy_output(peaked_model, make_prompts, speculative):
    model = peaked_model(3)
    prompts = make_prompts(12, model.cfg.vocab_size, 1, 10, seed=21)
    free = generate(model, prompts, N_NEW, speculative=speculative).tokens
    eos = free[0][5]
    stopped = generate(model, prompts, N_NEW, speculative=speculative, eos_id=eos)
    for row, tokens in enumerate(free):
        cut = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        assert stopped.tokens[row] == tokens[:cut]
        assert stopped.finished_by_eos[row] == (eos in tokens)
    assert stopped.finished_by_eos[0]


def test_zero_new_tokens_gives_empty_rows(stub_model):
    out = generate(stub_model(follow_token), [[1, 2], [3]], 0)
    assert out.tokens == [[], []] and out.finished_by_eos == [False, False]


@pytest.mark.parametrize("prompts", [[[1] * 60], [[1], []]])
def test_prompt_outside_the_context_window_is_rejected(stub_model, prompts):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(stub_model(follow_token, max_seq_len=64), prompts, 5)


# --- the prompt's own scores (TGI's decoder_input_details) ------------------------------------


@pytest.mark.parametrize("head_type", ["linear", "sequential"])
def test_prompt_logprobs_of_a_ragged_prefill_match_a_forward_per_prompt(
    random_model, make_prompts, monkeypatch, head_type
):
    """One right-padded prefill scores each asked row's tokens 1..L-1 under head 1 exactly as an
    uncached forward over that prompt alone; rows not asked are skipped, and the chunks a long
    prompt is projected in join seamlessly."""
    monkeypatch.setattr(generate_module, "PROMPT_SCORE_CHUNK", 4)  # chunk edges inside and across rows
    model = random_model(head_type=head_type)
    prompts = make_prompts(5, model.cfg.vocab_size, 2, 12, seed=3)
    prompts[1] = [4]  # a single token: nothing to score
    rows = [0, 1, 3, 4]
    model.setup_caches(len(prompts))
    try:
        with torch.inference_mode():
            got = prompt_logprobs(model, prefill(model, prompts).hidden, prompts, rows)
    finally:
        model.reset_caches()
    assert len(got) == len(rows) and got[1] == []
    with torch.no_grad():
        for b, scores in zip(rows, got, strict=True):
            head1 = model(torch.tensor([prompts[b]]))[0, :-1, 0]  # [L-1, V]: position t predicts token t+1
            want = torch.log_softmax(head1, -1).gather(-1, torch.tensor(prompts[b][1:])[:, None])[:, 0]
            assert torch.allclose(torch.tensor(scores), want, atol=1e-5), (b, scores, want.tolist())
    assert prompt_logprobs(model, torch.zeros(1, 1, model.cfg.d_model), [[1]], []) == []
