"""`python -m bench.compaction`: KV-cache compaction, shifting rows down against fill order."""

from pathlib import Path

from bench.compaction import bench_compaction


def test_each_case_times_both_orders_and_counts_the_rows_each_copies(sequential_checkpoint: Path) -> None:
    out = bench_compaction(str(sequential_checkpoint), rows=8, position=1000, repeats=2)
    assert out["position"] <= 1000 and out["attention_layers"] > 2  # capped at the context; modules' layers too
    cases = out["cases"]
    assert cases["first_ends"]["rows_copied"] == {"shift": 7, "fill": 1}
    assert cases["last_ends"]["rows_copied"] == {"shift": 0, "fill": 0}
    assert cases["every_fourth_ends"]["rows_copied"] == {"shift": 6, "fill": 2}  # rows 0 and 4 of 8: 6, 7 fill them
    for case in cases.values():
        assert case["ms_median"]["shift"] > 0 and case["ms_median"]["fill"] > 0
