"""`python -m bench.attention`: eager generations over the same key counts twice, per backend set."""

import pytest

from bench.attention import bench_attention


def test_each_backend_set_times_a_first_and_a_second_generation_over_the_same_positions(
    byte_checkpoint: tuple[str, str],
) -> None:
    ckpt, corpus = byte_checkpoint
    out = bench_attention(ckpt, corpus, "cpu", new_tokens=500)
    assert out["device"] == "cpu" and out["dtype"] == "float32"
    assert out["new_tokens"] == 128 - 16  # capped where the 16-token prompt fills the context
    assert list(out["runs"]) == ["default"]  # the cuDNN-free set is a CUDA comparison
    run = out["runs"]["default"]
    assert run["first_ms_per_token"] > 0 and run["second_ms_per_token"] > 0
    assert run["first_over_second"] == pytest.approx(run["first_ms_per_token"] / run["second_ms_per_token"], abs=0.02)
