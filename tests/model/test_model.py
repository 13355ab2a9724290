"""MTPTransformer: output shapes, causality, KV-cache parity, and config validation."""

import pytest
import torch

from app.model.config import ConfigError, ModelConfig
from app.model.model import MTPTransformer, masked_attention

VOCAB, K, MAX_LEN = 50, 3, 24
ATOL = 1e-5  # cached vs uncached, float32

ENCODINGS = ["sinusoidal", "learned"]
NORMS = ["post", "pre"]
VARIANTS = [(pe, norm) for pe in ENCODINGS for norm in NORMS]


def tiny_model(positional_encoding: str = "sinusoidal", norm_position: str = "post", seed: int = 0) -> MTPTransformer:
    """A small float32 model in eval mode, with weights perturbed well away from the 0.02 init.

    The default init gives near-uniform logits, which would let a broken cache pass a 1e-5
    comparison; noise of 0.15 makes logits O(1) (std ~0.9) while float32 rounding between the
    cached and uncached kernels stays ~2e-6 (at 0.3, post-norm amplifies it past 1e-5).
    """
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2,
        num_heads=4,
        d_ff=64,
        k=K,
        dropout_rate=0.0,
        max_seq_len=MAX_LEN,
        positional_encoding=positional_encoding,
        norm_position=norm_position,
    )
    model = MTPTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn_like(p))
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same(out: torch.Tensor, expected: torch.Tensor, where: str = "") -> None:
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0, msg=lambda m: f"{where}: {m}")


def positions(start: int, length: int, batch: int) -> torch.Tensor:
    return torch.arange(start, start + length).expand(batch, length)  # [B, T]


# --- shapes -----------------------------------------------------------------------------------


def test_forward_gives_k_logit_vectors_per_position():
    model = tiny_model()
    logits = model(random_ids(2, 7))
    assert logits.shape == (2, 7, K, VOCAB)


def test_last_only_gives_the_last_position_of_the_full_output():
    model = tiny_model()
    idx = random_ids(3, 9)
    last = model(idx, last_only=True)
    assert last.shape == (3, K, VOCAB)
    torch.testing.assert_close(last, model(idx)[:, -1])


def test_predict_proba_rows_are_distributions():
    model = tiny_model()
    probs = model.predict_proba(random_ids(2, 5))
    assert probs.shape == (2, K, VOCAB)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, K))


# --- causality --------------------------------------------------------------------------------


@pytest.mark.parametrize(("positional_encoding", "norm_position"), VARIANTS)
def test_changing_a_later_token_leaves_earlier_positions_unchanged(positional_encoding, norm_position):
    model = tiny_model(positional_encoding, norm_position)
    idx = random_ids(2, 12)
    changed = idx.clone()
    t = 6
    changed[:, t] = (changed[:, t] + 1) % VOCAB
    before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-6, rtol=0)
    # not vacuous: the changed position and those after it do see the change
    assert not torch.allclose(after[:, t:], before[:, t:], atol=1e-3)


# --- KV cache parity --------------------------------------------------------------------------


@pytest.mark.parametrize(("positional_encoding", "norm_position"), VARIANTS)
def test_cached_one_token_per_step_matches_uncached(positional_encoding, norm_position):
    model = tiny_model(positional_encoding, norm_position)
    B, prefill = 2, 5
    idx = random_ids(B, MAX_LEN)
    expected = model(idx)  # [B, T, k, V]
    model.setup_caches(max_batch=B)
    out = model(idx[:, :prefill], input_pos=positions(0, prefill, B))
    assert_same(out, expected[:, :prefill], "prefill")
    for t in range(prefill, MAX_LEN):
        out = model(idx[:, t : t + 1], input_pos=positions(t, 1, B))
        assert_same(out, expected[:, t : t + 1], f"position {t}")


@pytest.mark.parametrize(("positional_encoding", "norm_position"), VARIANTS)
def test_cached_several_tokens_per_step_matches_uncached(positional_encoding, norm_position):
    model = tiny_model(positional_encoding, norm_position)
    B = 2
    idx = random_ids(B, MAX_LEN, seed=2)
    expected = model(idx)
    model.setup_caches(max_batch=4)  # larger than the batch: rows past B stay unused
    start = 0
    for size in (4, 3, 1, 5, 2, 4, 5):  # sums to MAX_LEN
        out = model(idx[:, start : start + size], input_pos=positions(start, size, B))
        assert_same(out, expected[:, start : start + size], f"chunk at {start}")
        start += size
    assert start == MAX_LEN


def test_cached_last_only_matches_uncached_last_position():
    model = tiny_model()
    idx = random_ids(2, 10)
    expected = model(idx, last_only=True)
    model.setup_caches(max_batch=2)
    model(idx[:, :6], input_pos=positions(0, 6, 2))
    out = model(idx[:, 6:], input_pos=positions(6, 4, 2), last_only=True)
    assert_same(out, expected, "last position")


@pytest.mark.parametrize("positional_encoding", ENCODINGS)
def test_cached_batch_with_different_row_lengths_matches_uncached(positional_encoding):
    model = tiny_model(positional_encoding)
    lengths = [7, 3, 5]
    B, total = len(lengths), MAX_LEN - 4
    seqs = random_ids(B, total, seed=3)  # each row's own full sequence
    expected = [model(seqs[b : b + 1])[0] for b in range(B)]  # each [total, k, V], uncached, alone
    model.setup_caches(max_batch=B)

    # right-padded prefill; the padding (token 0) lands in the cache past each row's length
    width = max(lengths)
    prompt = torch.zeros(B, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        prompt[b, :n] = seqs[b, :n]
    out = model(prompt, input_pos=positions(0, width, B))
    for b, n in enumerate(lengths):
        assert_same(out[b, :n], expected[b][:n], f"prefill row {b}")

    # then each row continues from its own length: one token per step, then two per step
    pos = torch.tensor(lengths)
    for size in (1, 1, 1, 2, 2, 1):
        input_pos = pos[:, None] + torch.arange(size)  # [B, size], different per row
        step_ids = torch.stack([seqs[b, input_pos[b]] for b in range(B)])
        out = model(step_ids, input_pos=input_pos)
        for b in range(B):
            assert_same(out[b], expected[b][input_pos[b]], f"row {b} at {input_pos[b].tolist()}")
        pos += size


def test_a_bfloat16_cache_keeps_the_keys_in_bfloat16_and_attends_them_in_the_models_dtype():
    """model.kv_dtype: setup_caches allocates every layer's keys and values in it; a cached
    decode attends them in float32 (no dtype error from the attention kernel) and stays within
    bfloat16's rounding of the keys from the uncached forward, far from any logit's scale."""
    model = tiny_model()
    B = 2
    idx = random_ids(B, MAX_LEN, seed=4)
    expected = model(idx)
    model.kv_dtype = torch.bfloat16
    model.setup_caches(max_batch=B)
    assert all(c is not None and c.k_cache.dtype == c.v_cache.dtype == torch.bfloat16 for c in model.kv_caches())
    out = model(idx[:, :6], input_pos=positions(0, 6, B))
    steps = [out] + [model(idx[:, t : t + 1], input_pos=positions(t, 1, B)) for t in range(6, MAX_LEN)]
    got = torch.cat(steps, dim=1)
    assert got.dtype == torch.float32
    gap = (got - expected).abs().max().item()
    assert 0 < gap < 0.05 * expected.abs().max().item()  # rounded keys, not float32's 1e-5 (ATOL)
    model.setup_caches(max_batch=B, dtype=torch.float32)  # an explicit dtype wins
    assert all(c is not None and c.k_cache.dtype == torch.float32 for c in model.kv_caches())


def test_the_written_out_attention_of_compiled_cpu_steps_matches_the_fused_kernel():
    """masked_attention (what a compiled CPU step attends with) against scaled_dot_product_attention,
    for 1 to 3 queries per row at positions that differ by row, over a key count past the last."""
    torch.manual_seed(0)
    B, H, S, Dh = 3, 4, 20, 8
    keys, values = torch.randn(B, H, S, Dh), torch.randn(B, H, S, Dh)
    for T in (1, 2, 3):
        q = torch.randn(B, H, T, Dh) * 3  # sharp weights: a wrong scale or mask shows
        input_pos = torch.tensor([[2], [9], [15]]) + torch.arange(T)  # [B, T]
        mask = (torch.arange(S)[None, None, :] <= input_pos[:, :, None])[:, None]  # [B, 1, T, S]
        got = masked_attention(q, keys, values, mask)
        want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _compacted_rows_continue_like_uncached(B: int, order: list[int], seed: int) -> None:
    """Fill B cache rows to `filled`, write stale entries past it in every row, keep the old
    rows `order` (old row order[r] moves to row r, carrying only its filled positions), and
    check each kept row's next steps against the uncached model: the stale entries of
    whichever old row held its new place must stay masked."""
    model = tiny_model()
    filled = 9
    seqs = random_ids(B, MAX_LEN, seed=seed)
    expected = [model(seqs[b : b + 1])[0] for b in range(B)]
    model.setup_caches(max_batch=B)
    model(seqs[:, :filled], input_pos=positions(0, filled, B))
    model(seqs[:, filled : filled + 3], input_pos=positions(filled, 3, B))  # writes past `filled` everywhere
    model.compact_cache_rows(torch.tensor(order), length=filled)
    kept = seqs[order]
    for t in range(filled, MAX_LEN):
        out = model(kept[:, t : t + 1], input_pos=positions(t, 1, len(order)))
        for r, b in enumerate(order):
            assert_same(out[r, 0], expected[b][t], f"row {b} (now {r}) at {t}")


def test_compacted_cache_rows_continue_like_uncached():
    _compacted_rows_continue_like_uncached(4, [0, 2], seed=4)  # rows 1 and 3 leave; 2 moves down to 1


def test_cache_rows_compacted_out_of_order_continue_like_uncached():
    """The engine compacts in fill order (a survivor past the new row count fills a row that
    ended, the others stay): rows 1 and 3 of 5 leave, row 4 moves to row 1, rows 0 and 2 stay."""
    _compacted_rows_continue_like_uncached(5, [0, 4, 2], seed=5)


# --- config validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 30, "num_heads": 4}, "divisible by num_heads"),
        ({"k": 0}, "k must be a positive integer"),
        ({"k": -2}, "k must be a positive integer"),
        ({"vocab_size": True}, "vocab_size must be a positive integer"),
        ({"n_layers": 2.0}, "n_layers must be a positive integer"),
        ({"positional_encoding": "rope"}, "positional_encoding must be one of"),
        ({"norm_position": "sandwich"}, "norm_position must be one of"),
        ({"gelu": "relu"}, "gelu must be one of"),
        ({"dropout_rate": 1.0}, "dropout_rate must be in"),
        ({"dropout_rate": -0.1}, "dropout_rate must be in"),
        ({"d_model": 33, "num_heads": 3}, "even d_model"),
    ],
)
def test_invalid_config_raises_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**overrides)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError, match="unknown config fields: n_embd, n_head"):
        ModelConfig.from_dict({"d_model": 64, "n_head": 4, "n_embd": 64})


def test_from_dict_rejects_values_of_the_wrong_type():
    with pytest.raises(ConfigError, match="d_model"):
        ModelConfig.from_dict({"d_model": "64"})


def test_config_survives_a_dict_round_trip():
    cfg = ModelConfig(vocab_size=77, d_model=48, num_heads=3, k=2, positional_encoding="learned", norm_position="pre")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
