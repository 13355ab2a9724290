"""`python -m bench.startup_table`: the draft policy's start-up table at several warm-up lengths."""

from typing import Any

import pytest

from app.engine import drafts
from bench import startup_table
from bench.startup_table import startup_tables


def test_startup_tables_time_every_warm_up_length_in_each_round(
    byte_checkpoint: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt, _ = byte_checkpoint
    tables: list[int | None] = []  # each table's warm-up length, in the order made
    steps: list[int] = []  # the eager steps each table ran
    step, table = drafts.forward_step, startup_table.time_verify_steps

    def counted_step(*args: Any, **kwargs: Any) -> Any:
        steps[-1] += 1
        return step(*args, **kwargs)

    def recorded_table(model: Any, max_batch_size: int, compiled: Any = None, warm_steps: int | None = None) -> Any:
        tables.append(warm_steps)
        steps.append(0)
        return table(model, max_batch_size, compiled, warm_steps=warm_steps)

    monkeypatch.setattr(drafts, "forward_step", counted_step)
    monkeypatch.setattr(startup_table, "time_verify_steps", recorded_table)
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
    # each round makes a table at each length in turn, and more warm-up steps run more steps (a
    # count, not the seconds the tables took: those were compared once, and a slow moment of a
    # shared host turned them round)
    assert tables == [1, 3, 1, 3]
    assert steps[1] > steps[0] and steps[3] > steps[2]
