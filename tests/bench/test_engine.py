"""`mtp bench engine`: the continuous batch without HTTP, adaptive vs fixed draft counts."""

from bench.engine import bench_engine


def test_bench_engine_reports_both_draft_modes_at_both_stream_counts(byte_checkpoint: tuple[str, str]) -> None:
    ckpt, corpus = byte_checkpoint
    r = bench_engine(ckpt, corpus, streams=4, new_tokens=8, repeats=1)
    for mode in ("adaptive", "fixed"):
        assert set(r["tokens_per_s_median"][mode]) == {"1", "4"}
        assert all(v > 0 for v in r["tokens_per_s_median"][mode].values())
    assert set(r["ratios"]) == {
        "adaptive_vs_fixed_4_streams",
        "adaptive_vs_fixed_1_stream",
        "adaptive_4_vs_1_stream",
        "fixed_4_vs_1_stream",
    }
    assert list(r["drafts_by_batch_size"]) == ["1", "2", "4"]  # batch sizes timed at start-up
    assert all(0 <= n <= 3 for n in r["drafts_by_batch_size"].values())  # k = 4: up to 3 drafts
    assert all(len(row) == 4 for row in r["step_ms_by_batch_and_drafts"].values())
