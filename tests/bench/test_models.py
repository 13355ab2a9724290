"""The checkpoint comparison (bench/models.py): bytes counted from the generated text, the
request length set in bytes per tokenizer, ratios from the phases' medians, bad arguments
refused before any server starts."""

import asyncio
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from app.model.checkpoint import CheckpointError, save_checkpoint
from app.model.config import ModelConfig
from app.model.model import MTPTransformer
from app.model.tokenizer import Tokenizer
from app.training.data import read_corpus, split_text
from bench import models
from bench.models import bench_models, plan, summarize, text_load
from tests.bench.conftest import TEXT


def phase(bytes_per_s: float, tokens_per_forward: float | None = 2.0) -> dict[str, Any]:
    return {"bytes_per_s": bytes_per_s, "tokens_per_s": 2 * bytes_per_s, "tokens_per_forward": tokens_per_forward}


def test_ratios_are_each_checkpoints_median_over_the_firsts() -> None:
    entries: list[dict[str, Any]] = [
        {"phases": [phase(100.0), phase(300.0), phase(200.0)]},
        {"phases": [phase(50.0, None), phase(150.0, 3.0), phase(90.0, 1.0)]},
    ]
    summarize(entries)
    assert entries[0]["median"] == {"bytes_per_s": 200.0, "tokens_per_s": 400.0, "tokens_per_forward": 2.0}
    assert entries[1]["median"] == {"bytes_per_s": 90.0, "tokens_per_s": 180.0, "tokens_per_forward": 2.0}
    assert [e["bytes_per_s_vs_first"] for e in entries] == [1.0, 0.45]


def test_text_load_counts_the_utf8_bytes_of_the_generated_text(server: Any) -> None:
    prompt = "naïve café, 東京"  # the tiny BPE tokenizer's multi-byte text: bytes != tokens != characters
    r = asyncio.run(text_load(server.url, [prompt], streams=1, new_tokens=12))
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 12, "details": True}}
    whole = httpx.post(f"{server.url}/generate", json=body, timeout=30).json()  # greedy: the same text
    assert r["sequences"] == 1 and r["errors"] == 0
    assert r["bytes"] == len(whole["generated_text"].encode())
    assert r["tokens"] == whole["details"]["generated_tokens"]
    assert 1.0 <= r["tokens_per_forward"] <= 3.0  # k = 3


def test_requests_ask_each_tokenizer_for_the_same_bytes(byte_checkpoint: tuple[str, str], tmp_path: Path) -> None:
    ckpt, corpus = byte_checkpoint
    held = split_text(read_corpus(corpus))[1]
    tok = Tokenizer.train([TEXT], 300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, num_heads=4, d_ff=64, k=2, max_seq_len=128)
    bpe = str(save_checkpoint(tmp_path / "bpe", MTPTransformer(cfg), tok))
    texts = models.heldout_texts(held, 2, 16)
    assert plan(ckpt, held, texts, 60)["max_new_tokens"] == 60  # one byte per token
    p = plan(bpe, held, texts, 60)
    assert p["bytes_per_token"] == round(len(held) / len(tok.encode(held)), 3) > 1.0
    assert p["max_new_tokens"] == round(60 / (len(held) / len(tok.encode(held)))) < 60


def test_bench_models_runs_alternating_servers(byte_checkpoint: tuple[str, str], monkeypatch: Any) -> None:
    ckpt, corpus = byte_checkpoint
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    # the checkpoint against itself: two servers, one after the other, eager steps
    eager = {"compile": False}
    r = bench_models([ckpt, ckpt], corpus, rounds=1, prompts=2, new_bytes=24, prompt_chars=16, settings=eager)
    first, second = r["checkpoints"]
    assert r["reference"] == ckpt and first["max_new_tokens"] == 24
    for e in (first, second):
        [p] = e["phases"]
        assert p["sequences"] == 2 and p["errors"] == 0 and p["bytes"] > 0
        assert p["compiled"] is None  # /info's entry: compile off
        assert e["median"]["bytes_per_s"] == p["bytes_per_s"]
    assert first["bytes_per_s_vs_first"] == 1.0
    assert second["bytes_per_s_vs_first"] == round(second["median"]["bytes_per_s"] / first["median"]["bytes_per_s"], 3)


def test_bad_arguments_are_refused_before_any_server_starts(
    byte_checkpoint: tuple[str, str], tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    ckpt, corpus = byte_checkpoint
    monkeypatch.setattr(models, "served_phase", lambda *a, **k: pytest.fail("a server was started"))
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        bench_models([ckpt], corpus, rounds=0)
    with pytest.raises(ValueError, match="context of 128 tokens; lower --new-bytes"):
        bench_models([ckpt], corpus, new_bytes=200, prompt_chars=16)
    with pytest.raises(CheckpointError, match="missing file"):
        bench_models([ckpt, str(tmp_path / "nothing")], corpus, new_bytes=24, prompt_chars=16)
    monkeypatch.setattr(sys, "argv", ["bench.models", ckpt, "--corpus", str(tmp_path / "none.txt")])
    with pytest.raises(SystemExit) as exit_:
        models.main()
    assert exit_.value.code == 2 and "no such corpus file" in capsys.readouterr().err
