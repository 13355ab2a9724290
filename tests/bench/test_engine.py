"""`mtp bench engine`: the continuous batch without HTTP, adaptive vs fixed draft counts and vs
requests that do not speculate, and with sequential heads vs the policy without shallow steps.
Eager steps here: the compiled ones have their own tests (tests/engine/test_compiled.py) and
cost minutes to build."""

from pathlib import Path

import pytest
import torch

from app.model.checkpoint import save_checkpoint
from app.model.config import ModelConfig
from app.model.model import MTPTransformer
from app.model.tokenizer import Tokenizer
from bench.engine import bench_engine
from tests.bench.conftest import TEXT

EAGER = {"compile": False}


def test_bench_engine_reports_each_draft_mode_at_both_stream_counts(byte_checkpoint: tuple[str, str]) -> None:
    ckpt, corpus = byte_checkpoint
    r = bench_engine(ckpt, corpus, streams=4, new_tokens=8, repeats=1, settings=EAGER)
    modes = {"adaptive", "fixed", "plain"}  # linear heads: no shallow steps
    assert set(r["tokens_per_s_median"]) == modes
    for mode in modes:
        assert set(r["tokens_per_s_median"][mode]) == {"1", "4"}
        assert all(v > 0 for v in r["tokens_per_s_median"][mode].values())
    assert set(r["ratios"]) == {
        "adaptive_vs_fixed_4_streams",
        "adaptive_vs_fixed_1_stream",
        "adaptive_vs_plain_4_streams",
        "adaptive_vs_plain_1_stream",
        "adaptive_4_vs_1_stream",
        "fixed_4_vs_1_stream",
    }
    # plain requests: one token per row and pass after the prefill's, up to 4 rows a pass at 4
    # streams; at one stream a fixed pass verifies three drafts and makes 1 to 4 tokens
    plain, fixed = r["decode_passes"]["plain"], r["decode_passes"]["fixed"]
    assert plain["1"]["tokens_per_pass"] == 1.0 and 1.0 < plain["4"]["tokens_per_pass"] <= 4.0
    assert 1.0 <= fixed["1"]["tokens_per_pass"] <= 4.0
    assert all(by[s]["mean_ms"] > 0 for by in (plain, fixed) for s in ("1", "4"))
    assert list(r["drafts_by_batch_size"]) == ["1", "2", "4"]  # batch sizes timed at start-up
    assert all(0 <= n <= 3 for n in r["drafts_by_batch_size"].values())  # k = 4: up to 3 drafts
    assert all(len(row) == 4 for row in r["step_ms_by_batch_and_drafts"].values())
    choices = r["adaptive_choices_by_batch"]  # the adaptive mode's steps, at batch sizes 1 to 4
    assert set(choices) <= {"1", "2", "3", "4"} and all(0 <= int(n) <= 3 for row in choices.values() for n in row)
    assert sum(map(sum, (row.values() for row in choices.values()))) > 0
    passes = r["decode_passes_by_batch_and_threads"]  # adaptive threads on CPU (the default)
    assert "1" in passes and sum(passes["1"].values()) >= sum(choices["1"].values())
    assert set(passes["1"]) <= {"1", str(torch.get_num_threads())} and r["drift_retimings"] >= 0


def test_bench_engine_refuses_to_report_a_rate_over_failed_requests(
    byte_checkpoint: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode step that fails ends each request after its first token with an error event: a
    rate counted over those tokens would be a figure of nothing."""
    from app.engine.batch import DecodeBatch

    def broken(self: DecodeBatch) -> None:
        raise RuntimeError("a broken step")

    monkeypatch.setattr(DecodeBatch, "step", broken)
    ckpt, corpus = byte_checkpoint
    with pytest.raises(RuntimeError, match="the engine failed a request"):
        bench_engine(ckpt, corpus, streams=2, new_tokens=8, repeats=1, settings=EAGER)


def test_bench_engine_sets_sequential_heads_against_the_policy_without_shallow_steps(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    tok = Tokenizer.train([TEXT], 257)
    torch.manual_seed(0)
    dims = {"d_model": 32, "n_layers": 2, "num_heads": 4, "d_ff": 64, "k": 3, "max_seq_len": 128}
    cfg = ModelConfig(vocab_size=tok.vocab_size, head_type="sequential", **dims)
    save_checkpoint(tmp_path / "ckpt", MTPTransformer(cfg), tok, dtype="float32")
    r = bench_engine(str(tmp_path / "ckpt"), str(corpus), streams=2, new_tokens=8, repeats=1, settings=EAGER)
    assert set(r["tokens_per_s_median"]) == {"adaptive", "fixed", "no_shallow", "plain"}
    assert all(v > 0 for by in r["tokens_per_s_median"].values() for v in by.values())
    assert {"adaptive_vs_no_shallow_1_stream", "adaptive_vs_no_shallow_2_streams"} <= set(r["ratios"])
    # plain (0) and one module verifying one draft (1), timed at each batch size
    assert all(set(row) == {0, 1} for row in r["shallow_step_ms_by_batch"].values())
    assert isinstance(r["step_us_per_key_by_choice_by_batch"], dict)  # each choice's own, where estimated


def test_bench_engine_offline_sets_the_single_stream_against_generate_on_the_engines_steps(
    byte_checkpoint: tuple[str, str],
) -> None:
    """--offline: generate() at batch 1 at each draft count, between the engine's phases; the
    engine keeps serving after it (the second repeat runs after the first's offline phase)."""
    ckpt, corpus = byte_checkpoint
    r = bench_engine(ckpt, corpus, streams=2, new_tokens=8, repeats=2, settings=EAGER, offline=True)
    off = r["offline_1_stream"]
    assert set(off["tokens_per_s_median_by_drafts"]) == {"0", "1", "2", "3"}  # k = 4, eager: every count
    assert all(len(runs) == 2 and min(runs) > 0 for runs in off["tokens_per_s_runs_by_drafts"].values())
    assert all(len(runs) == 2 and min(runs) > 0 for by in r["tokens_per_s_runs"].values() for runs in by.values())
    best = off["tokens_per_s_median_by_drafts"][str(off["best_drafts"])]
    assert best == max(off["tokens_per_s_median_by_drafts"].values())
    engine_one = r["tokens_per_s_median"]["adaptive"]["1"]
    assert r["ratios"]["adaptive_1_stream_vs_offline_best"] == pytest.approx(engine_one / best, abs=0.01)
    assert off["policy_choice_drafts"] == r["drafts_by_batch_size"]["1"]  # linear heads: a draft count
    assert "adaptive_1_stream_vs_offline_at_policy_choice" in r["ratios"]
    final_only = r["final_only_1_stream"]  # the same stream with its tokens handed over at the end
    assert len(final_only["tokens_per_s_runs"]) == 2 and min(final_only["tokens_per_s_runs"]) > 0
    ratio = r["ratios"]["final_only_1_stream_vs_offline_best"]
    assert ratio == pytest.approx(final_only["tokens_per_s_median"] / best, abs=0.01)
    assert "final_only_1_stream_vs_offline_at_policy_choice" in r["ratios"]
