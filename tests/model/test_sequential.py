"""Sequential (DeepSeek-V3) MTP heads: the head_type setting, teacher-forced logits, the module
step with its own KV cache against the uncached forward, and checkpoint round trips."""

import json
from pathlib import Path

import pytest
import torch

from app.model.checkpoint import CheckpointError, check_checkpoint, load_checkpoint, load_config, save_checkpoint
from app.model.config import ConfigError, ModelConfig
from app.model.model import MTPTransformer
from app.model.tokenizer import Tokenizer

VOCAB, K, MAX_LEN = 50, 3, 24
ATOL = 1e-5  # cached vs uncached, float32
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "default"


def tiny_sequential(norm_position: str = "post", vocab_size: int = VOCAB, seed: int = 0) -> MTPTransformer:
    """A small float32 sequential model in eval mode, weights perturbed off the init (see test_model)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab_size,
        d_model=32,
        n_layers=2,
        num_heads=4,
        d_ff=64,
        k=K,
        dropout_rate=0.0,
        max_seq_len=MAX_LEN,
        norm_position=norm_position,
        head_type="sequential",
    )
    model = MTPTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn_like(p))
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def positions(start: int, length: int, batch: int) -> torch.Tensor:
    return torch.arange(start, start + length).expand(batch, length)  # [B, T]


def assert_same(out: torch.Tensor, expected: torch.Tensor, where: str = "") -> None:
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0, msg=lambda m: f"{where}: {m}")


# --- config -------------------------------------------------------------------------------------


def test_a_config_without_head_type_is_linear():
    data = ModelConfig(vocab_size=77, d_model=32, num_heads=4, k=2).to_dict()
    del data["head_type"]
    cfg = ModelConfig.from_dict(data)
    assert cfg.head_type == "linear"
    assert type(MTPTransformer(cfg).head).__name__ == "MTPHead"


def test_a_checkpoint_saved_before_head_types_loads_as_linear(tmp_path, tokenizer: Tokenizer):
    """A config.json written before head_type existed (no such field) is a linear checkpoint."""
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, num_heads=4, k=2, max_seq_len=16)
    out = save_checkpoint(tmp_path / "old", MTPTransformer(cfg).eval(), tokenizer)
    data = json.loads((out / "config.json").read_text())
    del data["head_type"]
    (out / "config.json").write_text(json.dumps(data))
    assert check_checkpoint(out).head_type == "linear"
    loaded, _ = load_checkpoint(out)
    assert type(loaded.head).__name__ == "MTPHead"


def test_the_committed_default_checkpoint_has_sequential_heads():
    assert json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())["head_type"] == "sequential"
    assert check_checkpoint(DEFAULT_CHECKPOINT).head_type == "sequential"


def test_an_unknown_head_type_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match=r"head_type must be one of \('linear', 'sequential'\), got 'parallel'"):
        ModelConfig(head_type="parallel")


def test_an_unknown_head_type_in_a_checkpoint_names_config_json(tmp_path):
    data = ModelConfig().to_dict() | {"head_type": "medusa"}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"config\.json: invalid config: head_type must be one of"):
        load_config(tmp_path)


# --- the teacher-forced forward -----------------------------------------------------------------


def test_forward_gives_k_logit_vectors_and_head_1_is_the_shared_projection_of_the_trunk():
    model = tiny_sequential()
    idx = random_ids(2, 9)
    logits = model(idx)
    assert logits.shape == (2, 9, K, VOCAB)
    torch.testing.assert_close(logits[:, :, 0], model.head.proj(model.trunk(idx)))


def test_depth_j_at_position_t_sees_tokens_up_to_t_plus_j_only():
    model = tiny_sequential()
    idx = random_ids(2, 12)
    s = 7
    changed = idx.clone()
    changed[:, s] = (changed[:, s] + 1) % VOCAB
    before, after = model(idx), model(changed)
    for j in range(K):  # depth j (head j + 1) at t reads token t + j: unchanged for t + j < s
        torch.testing.assert_close(after[:, : s - j, j], before[:, : s - j, j], atol=1e-6, rtol=0)
        assert not torch.allclose(after[:, s - j, j], before[:, s - j, j], atol=1e-3)


def test_predict_proba_chains_each_depth_on_the_greedy_tokens_before_it():
    model = tiny_sequential()
    idx = random_ids(2, 8)
    probs = model.predict_proba(idx)  # [B, k, V]
    chain = idx
    for j in range(K):  # teacher-forcing the greedy continuation reproduces every depth
        expected = torch.softmax(model(chain)[:, idx.shape[1] - 1, j], dim=-1)
        torch.testing.assert_close(probs[:, j], expected, atol=1e-6, rtol=0)
        chain = torch.cat([chain, probs[:, j].argmax(-1, keepdim=True)], dim=1)


def test_head_alone_computes_only_head_1_and_forward_refuses_the_cache():
    model = tiny_sequential()
    h = model.trunk(random_ids(1, 4))
    assert model.head(h, heads=slice(0, 1)).shape == (1, 4, 1, VOCAB)
    with pytest.raises(ValueError, match="mtp_state"):
        model.head(h)
    with pytest.raises(ValueError, match="trunk \\+ mtp_state"):
        model(random_ids(1, 4), input_pos=positions(0, 4, 1))


# --- the module step with its KV cache ----------------------------------------------------------


def cached_depths(model: MTPTransformer, ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Trunk and every module through their caches: logits [B, T, k, V] for ids [B, T] at input_pos,
    where depth j at t is fed ids[:, t + j] (so the last j positions of the chunk are not valid)."""
    h = model.trunk(ids, input_pos)
    logits = [model.head.proj(h)]
    for depth in range(1, K):
        next_ids = torch.cat([ids[:, depth:], ids[:, :depth]], dim=1)  # the tail wraps: invalid, ignored
        h = model.mtp_state(depth, h, next_ids, input_pos)
        logits.append(model.head.proj(h))
    return torch.stack(logits, dim=2)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_cached_module_steps_match_the_uncached_forward(norm_position):
    """Depth j's entry at t reads token t + j, so a chunk's last j entries are fed the wrong token:
    each chunk re-runs the last K - 1 positions of the one before (as serving re-runs the positions
    that read a rejected draft), and everything it computes with true tokens matches."""
    model = tiny_sequential(norm_position)
    B = 2
    idx = random_ids(B, MAX_LEN, seed=2)
    expected = model(idx)  # [B, T, k, V]
    model.setup_caches(max_batch=4)  # larger than the batch: rows past B stay unused
    start = 0
    for stop in (5, 9, 10, 16, 21, MAX_LEN):
        out = cached_depths(model, idx[:, start:stop], positions(start, stop - start, B))
        for j in range(K):  # depth j is valid where t + j < stop
            assert_same(out[:, : stop - j - start, j], expected[:, start : stop - j, j], f"depth {j} at {start}")
        start = stop - (K - 1)


def test_one_token_drafting_steps_match_the_uncached_forward_in_ragged_rows():
    """Serving's draft loop: trunk state at the last position p, then depth 1 on (state, token p+1),
    depth 2 on (its state, token p+2), one position at a time, rows at different positions."""
    model = tiny_sequential()
    lengths = [7, 3, 5]
    B = len(lengths)
    seqs = random_ids(B, MAX_LEN, seed=3)
    expected = [model(seqs[b : b + 1])[0] for b in range(B)]  # each [T, k, V], uncached, alone
    model.setup_caches(max_batch=B)
    pos = torch.tensor(lengths) - (K - 1)  # re-run the positions whose module entries read past the prompt
    width = max(lengths)
    prompt = torch.zeros(B, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        prompt[b, :n] = seqs[b, :n]
    h = model.trunk(prompt, positions(0, width, B))
    for depth in range(1, K):  # fill each module's cache over the prompt (tail positions invalid)
        h = model.mtp_state(depth, h, torch.roll(prompt, -depth, dims=1), positions(0, width, B))
    rows = torch.arange(B)
    for _ in range(8):
        input_pos = pos[:, None]  # [B, 1]
        h = model.trunk(seqs[rows, pos][:, None], input_pos)
        assert_same(model.head.proj(h)[:, 0], torch.stack([expected[b][pos[b], 0] for b in range(B)]), "head 1")
        for depth in range(1, K):
            h = model.mtp_state(depth, h, seqs[rows, pos + depth][:, None], input_pos)
            want = torch.stack([expected[b][pos[b], depth] for b in range(B)])
            assert_same(model.head.proj(h)[:, 0], want, f"depth {depth} at {pos.tolist()}")
        pos += 1


def test_setup_and_compaction_cover_the_module_caches():
    model = tiny_sequential()
    model.setup_caches(max_batch=3)
    caches = model.kv_caches()
    assert len(caches) == model.cfg.n_layers + K - 1 and all(c is not None for c in caches)
    B, filled = 3, 10
    seqs = random_ids(B, MAX_LEN, seed=4)
    expected = [model(seqs[b : b + 1])[0] for b in range(B)]
    cached_depths(model, seqs[:, :filled], positions(0, filled, B))
    model.compact_cache_rows(torch.tensor([2]), length=filled)  # row 2 moves to row 0
    start = filled - (K - 1)  # positions whose module entries read tokens past `filled`
    out = cached_depths(model, seqs[2:3, start:], positions(start, MAX_LEN - start, 1))
    for j in range(K):
        assert_same(out[0, : MAX_LEN - start - j, j], expected[2][start : MAX_LEN - j, j], f"depth {j}")
    model.reset_caches()
    assert all(c is None for c in model.kv_caches())


# --- checkpoints --------------------------------------------------------------------------------


def test_checkpoint_round_trip_records_the_head_type_and_gives_identical_logits(tmp_path, tokenizer: Tokenizer):
    model = tiny_sequential(vocab_size=tokenizer.vocab_size)
    out = save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    assert json.loads((out / "config.json").read_text())["head_type"] == "sequential"
    assert check_checkpoint(out).head_type == "sequential"
    loaded, _ = load_checkpoint(out)
    idx = torch.tensor([tokenizer.encode("The quick brown fox jumps")])
    assert torch.equal(loaded(idx), model(idx))
    assert torch.equal(loaded.predict_proba(idx), model.predict_proba(idx))


def test_a_sequential_checkpoint_does_not_load_as_linear(tmp_path, tokenizer: Tokenizer):
    out = save_checkpoint(tmp_path / "ckpt", tiny_sequential(vocab_size=tokenizer.vocab_size), tokenizer)
    config = json.loads((out / "config.json").read_text())
    del config["head_type"]  # now says linear, the weights say sequential
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor"):
        load_checkpoint(out)
