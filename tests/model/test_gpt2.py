"""GPT-2 import: parity with Hugging Face transformers on a tiny random GPT-2 (offline, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.model.checkpoint import load_checkpoint
from app.model.config import ConfigError
from app.model.gpt2 import GPT2ImportError, convert_gpt2_state_dict, gpt2_config, import_gpt2
from app.model.model import MTPTransformer
from app.model.tokenizer import EOT, Tokenizer

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max abs logit difference in float32
TEXT = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
] * 4


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXT, vocab_size=300)


@pytest.fixture(scope="module")
def hf_model(tokenizer: Tokenizer):
    """A seeded random GPT-2 whose LayerNorms and biases are random too, so a dropped or
    misplaced parameter shows in the logits."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        vocab_size=tokenizer.vocab_size,
        n_positions=64,
        bos_token_id=tokenizer.eot_id,
        eos_token_id=tokenizer.eot_id,
        attn_implementation="eager",  # the reference path, independent of our SDPA calls
    )
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after randomising
    return model.eval()


def _ours(hf_model, k: int, seed: int = 0, max_seq_len: int | None = None) -> MTPTransformer:
    cfg = gpt2_config(hf_model.config, k, max_seq_len)
    model = MTPTransformer(cfg)
    model.load_state_dict(convert_gpt2_state_dict(hf_model.state_dict(), cfg, k, seed))
    return model.eval()


def _ids(vocab_size: int, batch: int = 3, length: int = 20) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    return hf_model(ids).logits  # [B, T, V]


def test_gpt2_config_maps_fields(hf_model) -> None:
    cfg = gpt2_config(hf_model.config, k=3)
    assert cfg.vocab_size == hf_model.config.vocab_size
    assert (cfg.d_model, cfg.n_layers, cfg.num_heads, cfg.d_ff) == (64, 2, 4, 256)
    assert (cfg.k, cfg.max_seq_len, cfg.dropout_rate, cfg.layer_norm_eps) == (3, 64, 0.0, 1e-5)
    assert (cfg.norm_position, cfg.positional_encoding, cfg.gelu, cfg.bias) == ("pre", "learned", "tanh", True)
    assert gpt2_config(hf_model.config.to_dict(), k=3) == cfg  # config.json as a dict maps the same
    assert gpt2_config({"activation_function": "gelu"}, k=1).gelu == "exact"


@pytest.mark.parametrize(
    "override", [{"activation_function": "relu"}, {"scale_attn_by_inverse_layer_idx": True}, {"n_positions": 16}]
)
def test_gpt2_config_rejects_what_it_cannot_reproduce(hf_model, override) -> None:
    with pytest.raises(ConfigError):
        gpt2_config({**hf_model.config.to_dict(), **override}, k=1, max_seq_len=32)


def test_next_token_logits_match_transformers(hf_model) -> None:
    ids = _ids(hf_model.config.vocab_size)
    ours = _ours(hf_model, k=1)(ids)  # [B, T, 1, V]
    assert (ours[:, :, 0] - _hf_logits(hf_model, ids)).abs().max() <= TOL


def test_k4_head1_matches_and_extra_heads_are_seeded_copies(hf_model) -> None:
    ids = _ids(hf_model.config.vocab_size)
    B, T = ids.shape
    V = hf_model.config.vocab_size
    model = _ours(hf_model, k=4)
    with torch.no_grad():
        ours = model(ids)
    assert ours.shape == (B, T, 4, V)
    assert (ours[:, :, 0] - _hf_logits(hf_model, ids)).abs().max() <= TOL
    # heads 2..4: head 1 plus fresh N(0, 0.02) noise, zero bias, reproducible from the seed
    weight = model.head.proj.weight.detach().view(4, V, -1)  # [k, V, C]
    noise = weight[1:] - weight[:1]
    assert 0.015 < noise.std().item() < 0.025
    assert not torch.equal(noise[0], noise[1])
    assert torch.count_nonzero(model.head.proj.bias) == 0
    assert torch.equal(_ours(hf_model, k=4, seed=0).head.proj.weight, model.head.proj.weight)
    assert not torch.equal(_ours(hf_model, k=4, seed=1).head.proj.weight, model.head.proj.weight)


def test_shorter_max_seq_len_keeps_leading_positions(hf_model) -> None:
    ids = _ids(hf_model.config.vocab_size)
    model = _ours(hf_model, k=2, max_seq_len=32)
    assert model.pos_emb is not None and model.pos_emb.weight.shape[0] == 32
    with torch.no_grad():
        ours = model(ids)[:, :, 0]
    assert (ours - _hf_logits(hf_model, ids)).abs().max() <= TOL


@torch.no_grad()
def test_kv_cached_forward_matches_transformers(hf_model) -> None:
    """Prefill, then decode with rows at different positions; row 1 first prefills three wrong
    tokens (as a rejected speculative draft would), which later steps overwrite."""
    V = hf_model.config.vocab_size
    seqs = _ids(V, batch=2, length=12)
    ref = _hf_logits(hf_model, seqs)  # [2, 12, V]
    model = _ours(hf_model, k=4)
    model.setup_caches(2)

    prefill = seqs[:, :8].clone()
    prefill[1, 5:] = (prefill[1, 5:] + 1) % V  # rejected drafts at positions 5..7 of row 1
    pos = torch.arange(8).expand(2, 8)
    out = model(prefill, pos)  # [2, 8, k, V]
    assert (out[0, :, 0] - ref[0, :8]).abs().max() <= TOL
    assert (out[1, :5, 0] - ref[1, :5]).abs().max() <= TOL

    pos = torch.tensor([[8, 9], [5, 6]])  # row 1 rewinds and overwrites its drafts
    out = model(seqs.gather(1, pos), pos)
    for row in range(2):
        assert (out[row, :, 0] - ref[row, pos[row]]).abs().max() <= TOL

    pos = torch.tensor([[10], [7]])
    out = model(seqs.gather(1, pos), pos)
    for row in range(2):
        assert (out[row, :, 0] - ref[row, pos[row]]).abs().max() <= TOL


def test_convert_accepts_bare_names_and_ignores_mask_buffers(hf_model) -> None:
    """GPT2Model checkpoints have no "transformer." prefix; older transformers saved attn.bias."""
    cfg = gpt2_config(hf_model.config, k=2)
    state = hf_model.state_dict()
    bare = {name.removeprefix("transformer."): t for name, t in state.items() if name != "lm_head.weight"}
    bare["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.bool))
    bare["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    converted, reference = convert_gpt2_state_dict(bare, cfg, 2, 0), convert_gpt2_state_dict(state, cfg, 2, 0)
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[name], reference[name]) for name in reference)


def test_convert_names_missing_and_unexpected_tensors(hf_model) -> None:
    cfg = gpt2_config(hf_model.config, k=2)
    state = dict(hf_model.state_dict())
    del state["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(ValueError, match=r"missing tensors: h\.1\.mlp\.c_fc\.weight"):
        convert_gpt2_state_dict(state, cfg, 2, 0)
    state = {**hf_model.state_dict(), "transformer.h.2.ln_1.weight": torch.ones(64)}
    with pytest.raises(ValueError, match=r"unexpected tensors: h\.2\.ln_1\.weight"):
        convert_gpt2_state_dict(state, cfg, 2, 0)


def _save_gpt2(hf_model, directory: Path) -> Path:
    hf_model.save_pretrained(directory, safe_serialization=True)
    return directory


def test_import_gpt2_end_to_end(hf_model, tokenizer: Tokenizer, tmp_path: Path) -> None:
    src = _save_gpt2(hf_model, tmp_path / "gpt2")
    tokenizer.save(src / "tokenizer.json")
    out = import_gpt2(src, tmp_path / "ours", k=4, seed=0)
    model, tok = load_checkpoint(out)
    assert model.cfg.k == 4
    assert tok.encode(TEXT[0]) == tokenizer.encode(TEXT[0]) and tok.eot_id == tokenizer.eot_id
    ids = _ids(hf_model.config.vocab_size)
    with torch.no_grad():
        ours = model(ids)
    assert (ours[:, :, 0] - _hf_logits(hf_model, ids)).abs().max() <= TOL
    report = json.loads((out / "report.json").read_text())
    assert report["source_format"] == "gpt2" and report["k"] == 4


def test_import_gpt2_reads_sharded_safetensors(hf_model, tokenizer: Tokenizer, tmp_path: Path) -> None:
    src = tmp_path / "gpt2"
    hf_model.save_pretrained(src, safe_serialization=True, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file() and not (src / "model.safetensors").exists()
    tokenizer.save(src / "tokenizer.json")
    model, _ = load_checkpoint(import_gpt2(src, tmp_path / "ours", k=2))
    ids = _ids(hf_model.config.vocab_size)
    with torch.no_grad():
        ours = model(ids)
    assert (ours[:, :, 0] - _hf_logits(hf_model, ids)).abs().max() <= TOL


def test_import_names_the_weights_file_when_shapes_disagree(hf_model, tokenizer: Tokenizer, tmp_path: Path) -> None:
    src = _save_gpt2(hf_model, tmp_path / "gpt2")
    tokenizer.save(src / "tokenizer.json")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "n_inner": 128}))
    expected = (
        r"model\.safetensors: weights do not match config\.json \(wrongly shaped tensors: h\.0\.mlp\.c_fc\.weight"
    )
    with pytest.raises(GPT2ImportError, match=expected):
        import_gpt2(src, tmp_path / "ours")


def test_import_gpt2_builds_tokenizer_from_vocab_and_merges(hf_model, tokenizer: Tokenizer, tmp_path: Path) -> None:
    src = _save_gpt2(hf_model, tmp_path / "gpt2")
    tokenizer.hf.model.save(str(src))  # writes vocab.json + merges.txt, as the original GPT-2 repo ships
    assert not (src / "tokenizer.json").exists()
    _, tok = load_checkpoint(import_gpt2(src, tmp_path / "ours", k=2, dtype="bfloat16"))
    text = f"{TEXT[1]}{EOT}{TEXT[2]}"
    assert tok.encode(text) == tokenizer.encode(text)
    assert tok.eot_id == tokenizer.eot_id and tok.decode(tok.encode(text)) == text


def test_import_refuses_pickled_weights(hf_model, tmp_path: Path) -> None:
    hf_model.config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not a real pickle")  # must never be opened
    with pytest.raises(GPT2ImportError, match=r"pytorch_model\.bin.*safetensors is required"):
        import_gpt2(tmp_path, tmp_path / "ours")


def test_import_without_weights_names_the_missing_file(hf_model, tokenizer: Tokenizer, tmp_path: Path) -> None:
    hf_model.config.save_pretrained(tmp_path)
    tokenizer.save(tmp_path / "tokenizer.json")
    with pytest.raises(GPT2ImportError, match=r"model\.safetensors: missing file"):
        import_gpt2(tmp_path, tmp_path / "ours")


def test_import_empty_directory_names_config(tmp_path: Path) -> None:
    with pytest.raises(GPT2ImportError, match=r"config\.json: missing file"):
        import_gpt2(tmp_path, tmp_path / "ours")


def test_import_invalid_config_names_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GPT2ImportError, match=r"config\.json: not valid JSON"):
        import_gpt2(tmp_path, tmp_path / "ours")


def test_import_without_tokenizer_names_tokenizer(hf_model, tmp_path: Path) -> None:
    src = _save_gpt2(hf_model, tmp_path / "gpt2")
    with pytest.raises(GPT2ImportError, match=r"tokenizer\.json: missing file"):
        import_gpt2(src, tmp_path / "ours")
