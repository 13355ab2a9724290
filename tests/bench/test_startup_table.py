"""`python -m bench.startup_table`: the draft policy's start-up table at several warm-up lengths."""

from bench.startup_table import startup_tables


def test_startup_tables_time_every_warm_up_length_in_each_round(byte_checkpoint: tuple[str, str]) -> None:
    ckpt, _ = byte_checkpoint
    r = startup_tables(ckpt, [1, 3], rounds=2, compile=False, max_batch_size=2)
    assert r["warm_steps_in_use"] == 1  # eager steps: one warm-up step (their weights are shared)
    assert set(r["by_warm_steps"]) == {"1", "3"}
    for runs in r["by_warm_steps"].values():
        assert len(runs) == 2
        for run in runs:
            assert set(run["step_ms_by_drafts"]) == {1, 2}  # k = 4: 0 .. 3 drafts at batch 1 and 2
            assert all(len(row) == 4 and all(c > 0 for c in row) for row in run["step_ms_by_drafts"].values())
            assert run["shallow_step_ms_by_depth"] == {}  # linear heads: no shallow steps
            assert run["seconds"] > 0
    # more warm-up steps per timed one: the table takes longer to make
    assert sum(x["seconds"] for x in r["by_warm_steps"]["3"]) > sum(x["seconds"] for x in r["by_warm_steps"]["1"])
