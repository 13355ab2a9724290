"""score_next: every head's top tokens after each prompt, and candidate continuations' log-probabilities."""

import pytest
import torch

from app.decoding.predict import score_next


@pytest.fixture(scope="module")
def model(random_model):
    return random_model(seed=2, scale=0.2, vocab_size=16, k=3)


@torch.no_grad()
def last_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """log_softmax of every head at the prompt's last position, from a plain forward pass: [k, V]."""
    return torch.log_softmax(model(torch.tensor([prompt]))[0, -1], dim=-1)


def test_padded_batch_scores_like_one_prompt_at_a_time(model, make_prompts):
    prompts = make_prompts(8, 16, 1, 14, seed=0)
    together = score_next(model, prompts, top_n=5)
    for b, prompt in enumerate(prompts):
        alone = score_next(model, [prompt], top_n=5)
        assert together.top_ids[b] == alone.top_ids[0]
        assert together.greedy[b] == alone.greedy[0]
        torch.testing.assert_close(
            torch.tensor(together.top_probs[b]), torch.tensor(alone.top_probs[0]), atol=1e-5, rtol=0
        )


def test_top_tokens_are_each_heads_most_likely(model, make_prompts):
    prompts = make_prompts(4, 16, 2, 9, seed=1)
    scores = score_next(model, prompts, top_n=4)
    for b, prompt in enumerate(prompts):
        logp = last_logprobs(model, prompt)  # [k, V]
        top = logp.topk(4, dim=-1)
        assert scores.top_ids[b] == top.indices.tolist()
        assert scores.greedy[b] == logp.argmax(-1).tolist()
        torch.testing.assert_close(torch.tensor(scores.top_logprobs[b]), top.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(scores.top_probs[b]), top.values.exp(), atol=1e-5, rtol=0)


def test_top_n_beyond_the_vocabulary_returns_the_whole_distribution(model):
    scores = score_next(model, [[3, 1]], top_n=100)
    probs = torch.tensor(scores.top_probs[0])  # [k, V]
    assert probs.shape == (3, 16)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    assert (probs[:, :-1] >= probs[:, 1:]).all()  # sorted, most likely first


def test_candidate_token_j_is_scored_by_head_j(model):
    prompts = [[1, 2, 3], [7], [4, 4, 4, 4, 4, 9]]
    candidates = [[[5, 6, 7], [0], [5, 1]], [[2, 2]], []]
    scores = score_next(model, prompts, top_n=1, candidates=candidates)
    assert [len(c) for c in scores.candidates] == [3, 1, 0]
    for b, prompt in enumerate(prompts):
        logp = last_logprobs(model, prompt)  # [k, V]
        for cand, got in zip(candidates[b], scores.candidates[b]):
            want = [float(logp[j, tok]) for j, tok in enumerate(cand)]
            assert got == pytest.approx(want, abs=1e-5)


def test_no_candidates_gives_an_empty_list_per_prompt(model):
    assert score_next(model, [[1], [2, 3]], top_n=2).candidates == [[], []]
