"""CompiledDecoder with shape buckets (the engine's compiled steps): rows padded to a batch size
and tokens to a width give the eager greedy tokens at every batch size and draft count, and
sampling through padded steps keeps the joint distribution."""

import copy
import shutil

import pytest
import torch

from app.decoding.compiled import CompiledDecoder
from app.decoding.generate import generate
from app.decoding.sampling import SamplingParams
from tests.decoding.test_generate import N_NEW, assert_same_tokens
from tests.decoding.test_speculative import (
    PROMPT,
    SETTINGS,
    V_SMALL,
    chi2_pvalue,
    exact_joint,
    joint_counts,
)

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler"
)


def test_padded_shapes_give_the_eager_greedy_tokens_at_every_batch_size_and_draft_count(peaked_model, make_prompts):
    """Batch sizes 1..4 against compiled sizes 1, 2, 4 (3 pads to 4), draft counts 0..3 against
    widths 1, 2, 4 (2 drafts pad to width 4): the plain eager tokens, and the same acceptance
    as eager speculative decoding with that draft count."""
    model = copy.deepcopy(peaked_model(4))  # the decoder keeps caches on its model
    dec = CompiledDecoder(model, 4, batch_sizes=[1, 2, 4], widths=[1, 2, 4])
    assert dec.shapes() == [(b, w) for b in (1, 2, 4) for w in (1, 2, 4)]
    assert not dec.covers(5, 1) and not dec.covers(1, 5) and dec.covers(3, 3)
    prompts = make_prompts(4, model.cfg.vocab_size, 1, 12, seed=21)
    want = generate(model, prompts, N_NEW, speculative=False).tokens
    for n in range(1, 5):
        rows = prompts[:n]
        for draft_tokens in range(4):
            got = generate(model, rows, N_NEW, speculative=True, compiled=dec, draft_tokens=draft_tokens)
            assert_same_tokens(model, rows, got.tokens, want[:n], f"batch {n}, {draft_tokens} drafts")
            eager = generate(model, rows, N_NEW, speculative=True, draft_tokens=draft_tokens)
            assert got.stats.accepted_by_position == eager.stats.accepted_by_position
            dec.attach()
    sampled = [SamplingParams(do_sample=True, temperature=0.8, seed=s, frequency_penalty=0.5) for s in range(3)]
    got = generate(model, prompts[:3], N_NEW, sampled, compiled=dec, draft_tokens=2)  # forward path, padded
    assert got.tokens == generate(model, prompts[:3], N_NEW, sampled, draft_tokens=2).tokens


def test_a_step_outside_the_compiled_shapes_is_refused(peaked_model, make_prompts):
    model = copy.deepcopy(peaked_model(3))
    dec = CompiledDecoder(model, 4, batch_sizes=[1, 2], widths=[1])
    prompts = make_prompts(3, model.cfg.vocab_size, 1, 5, seed=3)
    with pytest.raises(ValueError, match="no compiled shape holds 3"):
        generate(model, prompts, 4, speculative=False, compiled=dec)
    with pytest.raises(ValueError, match="widths"):
        CompiledDecoder(model, 4, batch_sizes=[1], widths=[1, 4])


def test_sampling_through_padded_compiled_steps_keeps_the_joint_distribution(small_model):
    """One draft per pass (width 2) padded to width 3, 6000 rows padded to 6016: x1..x3 keep
    the exact joint distribution of head 1 processed by the settings."""
    model = copy.deepcopy(small_model)
    n, settings = 6000, SETTINGS[1]
    dec = CompiledDecoder(model, 6016, batch_sizes=[6016], widths=[1, 3])
    params = [SamplingParams(do_sample=True, seed=i, **settings) for i in range(n)]
    out = generate(model, [PROMPT] * n, 4, params, speculative=True, draft_tokens=1, compiled=dec)
    tokens = torch.tensor([t[:3] for t in out.tokens])
    assert chi2_pvalue(joint_counts(tokens, V_SMALL), exact_joint(model, settings, depth=3)) > 1e-3
