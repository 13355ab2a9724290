"""The decoding benchmarks run end to end on a small byte-level checkpoint and report what
they claim: identical greedy outputs, consistent token counts, and the step timings."""

import time
from itertools import pairwise
from pathlib import Path

import torch

from app.model.checkpoint import load_checkpoint, save_checkpoint
from app.model.config import ModelConfig
from app.model.model import MTPTransformer
from bench.decoding import bench_speculative
from bench.step import _switching_ms, bench_step


def test_bench_speculative_reports_identical_outputs_and_acceptance(byte_checkpoint: tuple[str, str]) -> None:
    ckpt, corpus = byte_checkpoint
    r = bench_speculative(ckpt, corpus, n_prompts=3, prompt_tokens=8, new_tokens=24, compile=False)
    assert r["identical_outputs"] is True
    assert r["bytes_per_token"] == 1.0  # one byte per token with a 257-token vocabulary
    assert r["plain_bytes_per_s"] == r["plain_tokens_per_s"]
    assert 1.0 <= r["tokens_per_forward"] <= 4.0
    assert list(r["acceptance_by_head"]) == ["head_2", "head_3", "head_4"]
    # a draft from head j+1 is only accepted after the one before it
    acc = list(r["acceptance_by_head"].values())
    assert all(0.0 <= b <= a <= 1.0 for a, b in pairwise(acc))
    assert len(r["per_prompt"]) == 3 and "compiled" not in r


def test_bench_speculative_runs_sequential_heads_eagerly(byte_checkpoint: tuple[str, str], tmp_path: Path) -> None:
    ckpt, corpus = byte_checkpoint
    _, tok = load_checkpoint(ckpt)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, d_model=32, n_layers=2, num_heads=4, d_ff=64, k=3, head_type="sequential"
    )
    seq = str(save_checkpoint(tmp_path / "seq", MTPTransformer(cfg), tok, dtype="float32"))
    r = bench_speculative(seq, corpus, n_prompts=2, prompt_tokens=8, new_tokens=16, compile=False)
    assert r["head_type"] == "sequential" and r["identical_outputs"] is True
    assert 1.0 <= r["tokens_per_forward"] <= 3.0 and r["bytes_per_forward"] == r["tokens_per_forward"]
    assert list(r["acceptance_by_head"]) == ["head_2", "head_3"] and r["speculative_tokens_per_s"] > 0


def test_bench_step_times_plain_and_verify_passes(byte_checkpoint: tuple[str, str]) -> None:
    r = bench_step(byte_checkpoint[0], compile=False)
    assert set(r["forward_ms"]) == {"T=1 (plain step)", "T=2 (verify 1 drafts)", "T=4 (verify 3 drafts)"}
    assert all(v > 0 for v in r["forward_ms"].values())
    assert r["verify_over_plain"] > 0 and "compiled_trunk_and_head1_ms" not in r


def test_bench_step_times_the_fused_greedy_steps_of_sequential_heads(
    byte_checkpoint: tuple[str, str], tmp_path: Path
) -> None:
    """Compiled (no autotuning: seconds a graph): the plain step unfused and fused, the shallow
    step and the step of every module, each timed."""
    _, tok = load_checkpoint(byte_checkpoint[0])
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, d_model=32, n_layers=2, num_heads=4, d_ff=64, k=3, head_type="sequential"
    )
    seq = str(save_checkpoint(tmp_path / "seq", MTPTransformer(cfg), tok, dtype="float32"))
    steps = bench_step(seq)["compiled_greedy_steps_ms"]
    assert set(steps) == {
        "plain: compiled forward + eager acceptance",
        "plain: one fused graph",
        "one module, verifying 1 draft (shallow)",
        "every module or head, verifying 2 drafts",
    }
    assert all(v > 0 for v in steps.values())


def test_the_step_after_a_switch_is_timed_against_a_warm_one() -> None:
    """A stand-in step that is slow right after the other shape ran, as a cold compiled graph is."""
    last = ["plain"]

    def plain() -> None:
        time.sleep(0.002 if last[0] == "verify" else 0.0002)
        last[0] = "plain"

    def verify() -> None:
        last[0] = "verify"

    r = _switching_ms(plain, verify, rounds=5, after=3)
    assert r["warm"] < 1.0 < r["after_1_other"] and r["after_31_others"] > 1.0
    first, *rest = r["steps_after_31_others"]  # the 1st, 2nd and 3rd step after 31 of the other
    assert first > 1.0 and len(rest) == 2 and all(ms < 1.0 for ms in rest)


def test_bench_threads_times_decoding_before_and_after_a_second_thread_uses_torch(
    byte_checkpoint: tuple[str, str],
) -> None:
    from bench.threads import bench_threads

    r = bench_threads(byte_checkpoint[0], n_prompts=2, new_tokens=8)
    for key in ("tokens_per_s_one_thread_used_torch", "tokens_per_s_after_an_op_on_a_second_thread"):
        assert set(r[key]) == {"plain", "speculative"} and all(v > 0 for v in r[key].values())
    assert set(r["slowdown"]) == {"plain", "speculative"}


def test_bench_speculative_draft_sweep_reports_every_smaller_draft_count(byte_checkpoint: tuple[str, str]) -> None:
    ckpt, corpus = byte_checkpoint
    r = bench_speculative(ckpt, corpus, n_prompts=2, prompt_tokens=8, new_tokens=16, compile=False, draft_sweep=True)
    assert r["identical_outputs"] is True  # every draft count gives the plain greedy tokens
    assert list(r["by_draft_tokens"]) == ["1", "2"]  # k = 4: 1 and 2 drafts; 3 is the main run
    for row in r["by_draft_tokens"].values():
        assert 1.0 <= row["tokens_per_forward"] and row["speedup"] > 0
