"""Checkpoint directories: round trips in each storage dtype, and errors that name the bad file."""

import json
from pathlib import Path

import pytest
import torch

from app.model.checkpoint import CheckpointError, load_checkpoint, resolve_kv_dtype, save_checkpoint
from app.model.config import ModelConfig
from app.model.model import MTPTransformer
from app.model.tokenizer import Tokenizer


def tiny_model(vocab_size: int) -> MTPTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, num_heads=4, d_ff=64, k=3, max_seq_len=16)
    model = MTPTransformer(cfg)
    with torch.no_grad():  # move weights off the 0.02 init so dtype rounding is visible
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def model(tokenizer: Tokenizer) -> MTPTransformer:
    return tiny_model(tokenizer.vocab_size)


@pytest.fixture
def ckpt(tmp_path: Path, model: MTPTransformer, tokenizer: Tokenizer) -> Path:
    return save_checkpoint(tmp_path / "ckpt", model, tokenizer)


def sample_ids(tokenizer: Tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode("The quick brown fox")])


# --- round trips --------------------------------------------------------------------------------


def test_float32_round_trip_is_exact(ckpt, model, tokenizer):
    loaded, loaded_tok = load_checkpoint(ckpt)
    assert loaded.cfg == model.cfg
    assert not loaded.training
    saved_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert saved_state.keys() == loaded_state.keys()
    for name, tensor in saved_state.items():
        assert loaded_state[name].dtype == torch.float32
        assert torch.equal(loaded_state[name], tensor), name
    ids = sample_ids(tokenizer)
    assert torch.equal(loaded(ids), model(ids))
    assert loaded_tok.encode("The quick brown fox, 東京") == tokenizer.encode("The quick brown fox, 東京")


def test_float16_storage_loads_as_rounded_float32(tmp_path, model, tokenizer):
    ckpt = save_checkpoint(tmp_path / "half", model, tokenizer, dtype="float16")
    loaded, _ = load_checkpoint(ckpt, dtype="float32")
    loaded_state = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert loaded_state[name].dtype == torch.float32
        assert torch.equal(loaded_state[name], tensor.half().float()), name
    ids = sample_ids(tokenizer)
    torch.testing.assert_close(loaded(ids), model(ids), atol=2e-2, rtol=1e-2)
    half_size = (ckpt / "model.safetensors").stat().st_size
    full_size = (save_checkpoint(tmp_path / "full", model, tokenizer) / "model.safetensors").stat().st_size
    assert half_size < 0.6 * full_size


def test_load_in_bfloat16_gives_a_bfloat16_model_with_close_probabilities(ckpt, model, tokenizer):
    loaded, _ = load_checkpoint(ckpt, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    ids = sample_ids(tokenizer)
    probs = loaded.predict_proba(ids)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, model.cfg.k))
    torch.testing.assert_close(probs, model.predict_proba(ids), atol=2e-2, rtol=0)


def test_report_is_saved_beside_the_weights(tmp_path, model, tokenizer):
    report = {"heldout": {"bits_per_byte": 1.25}}
    ckpt = save_checkpoint(tmp_path / "r", model, tokenizer, report=report)
    assert json.loads((ckpt / "report.json").read_text()) == report


def test_unknown_dtype_is_rejected(ckpt):
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_checkpoint(ckpt, dtype="int8")


# --- broken checkpoints ---------------------------------------------------------------------------


def edit_config(ckpt: Path, **changes) -> None:
    path = ckpt / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BROKEN = {
    "missing config": ("config.json", "missing file", lambda d: (d / "config.json").unlink()),
    "config not JSON": ("config.json", "not valid JSON", lambda d: (d / "config.json").write_text("{not json")),
    "config not an object": ("config.json", "expected a JSON object", lambda d: (d / "config.json").write_text("[1]")),
    "config bad value": ("config.json", "divisible by num_heads", lambda d: edit_config(d, num_heads=5)),
    "config unknown field": ("config.json", "unknown config fields: n_embd", lambda d: edit_config(d, n_embd=32)),
    "missing tokenizer": ("tokenizer.json", "missing file", lambda d: (d / "tokenizer.json").unlink()),
    "garbage tokenizer": ("tokenizer.json", "cannot load tokenizer", lambda d: (d / "tokenizer.json").write_text("{}")),
    "vocab too small": ("tokenizer.json", "config vocab_size is 10", lambda d: edit_config(d, vocab_size=10)),
    "missing weights": ("model.safetensors", "missing file", lambda d: (d / "model.safetensors").unlink()),
    "shape mismatch": ("model.safetensors", "config expects", lambda d: edit_config(d, d_ff=128)),
    "missing tensors": ("model.safetensors", "tensor names do not match", lambda d: edit_config(d, n_layers=3)),
    "truncated weights": ("model.safetensors", "corrupt safetensors", lambda d: truncate(d / "model.safetensors")),
    "garbage weights": (
        "model.safetensors",
        "corrupt safetensors",
        lambda d: (d / "model.safetensors").write_bytes(bytes(range(256)) * 4),
    ),
    "empty weights": ("model.safetensors", "corrupt safetensors", lambda d: (d / "model.safetensors").write_bytes(b"")),
}


@pytest.mark.parametrize(("filename", "problem", "breaker"), BROKEN.values(), ids=BROKEN.keys())
def test_broken_checkpoint_error_names_the_file(ckpt, filename, problem, breaker):
    breaker(ckpt)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt)
    message = str(info.value)
    assert str(ckpt / filename) in message
    assert problem in message


def test_missing_directory_error_names_the_directory(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(CheckpointError, match="checkpoint directory not found") as info:
        load_checkpoint(missing)
    assert str(missing) in str(info.value)


def test_shape_mismatch_error_names_the_tensor(ckpt):
    edit_config(ckpt, d_ff=128)
    with pytest.raises(CheckpointError, match=r"tensor blocks\.\d\.ffn\.fc\.(weight|bias) has shape"):
        load_checkpoint(ckpt)


def test_the_kv_cache_dtype_auto_is_bfloat16_only_for_float32_weights_in_compiled_cpu_steps():
    assert resolve_kv_dtype("auto", torch.float32, "cpu") == torch.bfloat16
    assert resolve_kv_dtype("auto", torch.float32, "cpu", compiled=False) == torch.float32  # eager: no copies
    assert resolve_kv_dtype("auto", torch.bfloat16, "cpu") == torch.bfloat16
    assert resolve_kv_dtype("auto", torch.float16, "cpu") == torch.float16
    assert resolve_kv_dtype("float32", torch.float32, "cpu") == torch.float32
    assert resolve_kv_dtype("bfloat16", torch.float32, "cpu", compiled=False) == torch.bfloat16
    with pytest.raises(ValueError):
        resolve_kv_dtype("int8", torch.float32, "cpu")
