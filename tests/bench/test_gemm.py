"""`python -m bench.gemm`: the engine's compiled greedy steps with each choice of GEMM kernels."""

from pathlib import Path

from bench.gemm import bench_gemm


def test_each_gemm_choice_times_the_engines_greedy_steps_and_emits_the_same_tokens(sequential_checkpoint: Path) -> None:
    # "ATEN": MKL for every matmul, one choice as "CPP" is, so neither times kernels while compiling
    out = bench_gemm(str(sequential_checkpoint), batches=[2], position=20, backends=("CPP", "ATEN"), rounds=2, calls=3)
    assert out["same_tokens"] is True
    assert set(out["compile_s"]) == {"CPP", "ATEN"}
    # k = 3 sequential heads: the plain step, the one-module shallow step, and the step verifying 2 drafts
    assert list(out["steps"]) == ["plain", "shallow 1", "verify 2"]
    for kind in out["steps"].values():
        cell = kind["batch 2"]
        assert cell["CPP_ms"] > 0 and cell["ATEN_ms"] > 0
        a, c = cell["ATEN_ms"], cell["CPP_ms"]
        # the ratio of the unrounded times: within the rounding of both figures (to 0.001 ms) and its own
        assert abs(cell["ATEN_over_CPP"] - a / c) <= a / c * (0.0005 / a + 0.0005 / c) * 1.01 + 0.0005
