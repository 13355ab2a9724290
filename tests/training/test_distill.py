"""Self-distillation of heads 2..k: head 1 and the trunk stay exactly as they were."""

import json
from pathlib import Path

import torch

from app.model.checkpoint import load_checkpoint, save_checkpoint
from app.model.config import ModelConfig
from app.model.model import MTPTransformer
from app.model.tokenizer import Tokenizer
from app.training.distill import distill_heads

TEXT = "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer.\n" * 40


def test_distill_changes_only_the_drafting_heads(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    tok = Tokenizer.train([TEXT], 300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, num_heads=4, d_ff=64, k=3, max_seq_len=64)
    save_checkpoint(tmp_path / "ckpt", MTPTransformer(cfg), tok, report={"note": "test"}, dtype="float32")
    before, _ = load_checkpoint(tmp_path / "ckpt")

    section = distill_heads(
        str(tmp_path / "ckpt"),
        str(corpus),
        out=str(tmp_path / "out"),
        prompts=8,
        prompt_tokens=8,
        new_tokens=16,
        steps=20,
        save_dtype="float32",
    )

    after, _ = load_checkpoint(tmp_path / "out")
    V = cfg.vocab_size
    b, a = before.state_dict(), after.state_dict()
    for name in b:
        if name.startswith("head."):
            continue
        assert torch.equal(b[name], a[name]), name
    assert torch.equal(b["head.proj.weight"][:V], a["head.proj.weight"][:V])
    assert torch.equal(b["head.proj.bias"][:V], a["head.proj.bias"][:V])
    assert not torch.equal(b["head.proj.weight"][V:], a["head.proj.weight"][V:])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["note"] == "test" and report["head_distillation"]["steps"] == 20
    assert section["positions"] > 0
