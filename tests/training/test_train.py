"""The training loop end to end: learning a fully determined corpus, the report, and resuming."""

import json
from pathlib import Path

import pytest

from app.model.checkpoint import load_checkpoint
from app.model.config import ModelConfig
from app.training.evaluate import evaluate_text
from app.training.train import TrainConfig, train

K = 4
# Letters and digits alternate, so the byte-level pre-tokenizer cuts every character into its own
# word: no BPE merge is possible, every token is one character, and each of the 20 tokens of a
# period is distinct, so the current token alone fixes the next K. (A run of letters alone, like
# "abcdefghij" * N, is one giant pre-token that BPE merges into a handful of huge tokens.)
PERIOD = "a0b1c2d3e4f5g6h7i8j9"


def tiny_run(corpus: Path, out: Path, steps: int, eval_interval: int) -> TrainConfig:
    model = ModelConfig(
        vocab_size=300, d_model=32, n_layers=1, num_heads=2, d_ff=64, k=K, dropout_rate=0.0, max_seq_len=32
    )
    return TrainConfig(
        corpus=str(corpus),
        out=str(out),
        model=model,
        batch_size=8,
        steps=steps,
        lr=1e-2,
        min_lr=1e-3,
        warmup=10,
        eval_interval=eval_interval,
        device="cpu",
        precision="fp32",
        save_dtype="float16",
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "periodic.txt"
    path.write_text(PERIOD * 500, encoding="utf-8")  # 10,000 characters; the last 1,000 are held out
    return path


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    report = train(tiny_run(corpus, out, steps=300, eval_interval=100), quiet=True)
    return out, report


def test_every_head_learns_a_fully_determined_sequence(trained):
    _, report = trained
    top1 = report["heldout"]["top1"]
    assert len(top1) == K
    assert all(acc >= 0.98 for acc in top1), top1
    assert report["heldout"]["bits_per_byte"] < 0.2


def test_report_json_and_png_are_written(trained):
    out, report = trained
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    heldout = on_disk["heldout"]
    assert len(heldout["loss"]) == K and len(heldout["top1"]) == K
    assert isinstance(heldout["bits_per_byte"], float)
    assert heldout["bytes"] == heldout["tokens"] > 0  # one byte per token in this corpus
    assert [h["step"] for h in on_disk["history"]] == [100, 200, 300]
    assert all(len(h["val_top1"]) == K and len(h["val_loss"]) == K for h in on_disk["history"])
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trained_checkpoint_reloads_and_still_predicts(trained, corpus):
    out, _ = trained
    model, tokenizer = load_checkpoint(out)  # stored as float16, loaded as float32
    held_out = corpus.read_text()[-1000:]
    stats = evaluate_text(model, tokenizer, held_out)
    assert all(acc >= 0.98 for acc in stats["top1"]), stats["top1"]
    assert (out / "train_state" / "state.safetensors").is_file()


def test_resume_continues_from_the_saved_step(corpus, tmp_path):
    first = train(tiny_run(corpus, tmp_path, steps=20, eval_interval=10), quiet=True)
    assert [h["step"] for h in first["history"]] == [10, 20]
    tokenizer_before = (tmp_path / "tokenizer.json").read_bytes()

    # resuming at the saved step trains nothing: the restored weights score exactly as before
    restored = train(tiny_run(corpus, tmp_path, steps=20, eval_interval=10), resume=True, quiet=True)
    assert restored["heldout"] == first["heldout"]
    assert restored["history"] == first["history"]

    resumed = train(tiny_run(corpus, tmp_path, steps=40, eval_interval=10), resume=True, quiet=True)

    assert [h["step"] for h in resumed["history"]] == [10, 20, 30, 40]
    assert resumed["history"][:2] == first["history"]
    assert json.loads((tmp_path / "train_state" / "state.json").read_text())["step"] == 40
    assert json.loads((tmp_path / "report.json").read_text())["history"] == resumed["history"]
    assert (tmp_path / "tokenizer.json").read_bytes() == tokenizer_before


def test_resume_without_saved_state_starts_from_scratch(corpus, tmp_path):
    report = train(tiny_run(corpus, tmp_path, steps=10, eval_interval=5), resume=True, quiet=True)
    assert [h["step"] for h in report["history"]] == [5, 10]
