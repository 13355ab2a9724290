"""A small byte-level checkpoint and corpus for the benchmark commands' tests."""

from pathlib import Path

import pytest
import torch

from app.model.checkpoint import save_checkpoint
from app.model.config import ModelConfig
from app.model.model import MTPTransformer
from app.model.tokenizer import Tokenizer

TEXT = "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer.\n" * 40


@pytest.fixture()
def byte_checkpoint(tmp_path: Path) -> tuple[str, str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    tok = Tokenizer.train([TEXT], 257)  # bytes only, as the default model
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, num_heads=4, d_ff=64, k=4, max_seq_len=128)
    save_checkpoint(tmp_path / "ckpt", MTPTransformer(cfg), tok, dtype="float32")
    return str(tmp_path / "ckpt"), str(corpus)
