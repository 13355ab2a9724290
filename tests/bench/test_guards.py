"""`python -m bench.guards`: a compiled batch-1 step through Dynamo with its graph's guards kept,
through Dynamo with none, and called directly."""

from pathlib import Path

from bench.guards import bench_guards


def test_each_step_is_timed_all_three_ways_with_the_same_tokens(sequential_checkpoint: Path) -> None:
    out = bench_guards(str(sequential_checkpoint), rounds=3, calls=25, position=1000, autotune=False)
    assert out["head_type"] == "sequential" and out["position"] < 1000  # capped within the context
    assert set(out["steps"]) == {"plain", "one_module_one_draft"}
    for step in out["steps"].values():
        assert step["same_tokens"]
        assert all(step["us_median"][name] > 0 for name in ("guards", "dynamo", "direct"))
        assert step["dynamo_over_guards"] > 0 and step["direct_over_dynamo"] > 0
