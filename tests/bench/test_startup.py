"""`python -m bench.startup`: each start of a real server on a tiny model is timed to /ready."""

from bench.startup import bench_startup


def test_cold_and_warm_starts_are_timed_and_summarised(byte_checkpoint: tuple[str, str]) -> None:
    ckpt, _ = byte_checkpoint
    out = bench_startup(ckpt, None, rounds=2, cold=True, cache_dir=None, settings={"compile": False})
    assert out["cold"]["this"]["ready_s"] > 0
    assert out["cold"]["this"]["compile_s"] is None  # nothing compiled: the log has no compile time
    assert len(out["warm_rounds"]["this"]) == 2
    assert out["warm"]["this"]["ready_s"] > 0 and "ratios" not in out  # no baseline, no ratio
    assert "filling_start" in out  # the cold start filled no cache (compiling is off), so one start fills it
