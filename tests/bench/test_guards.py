"""`python -m bench.guards`: a compiled batch-1 step with its graph's guards kept, against none."""

from pathlib import Path

from bench.guards import bench_guards


def test_each_step_is_timed_both_ways_with_the_same_tokens(sequential_checkpoint: Path) -> None:
    out = bench_guards(str(sequential_checkpoint), rounds=2, calls=25, position=1000, autotune=False)
    assert out["head_type"] == "sequential" and out["position"] < 1000  # capped within the context
    assert set(out["steps"]) == {"plain", "one_module_one_draft"}
    for step in out["steps"].values():
        assert step["same_tokens"]
        assert step["us_median"]["guards"] > 0 and step["us_median"]["no_guards"] > 0
        assert step["no_guards_over_guards"] > 0
