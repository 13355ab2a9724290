"""`python -m bench.thread_switch`: decode steps by batch size, thread count and place in a run."""

import pytest
import torch

from app.engine import threads
from bench.thread_switch import MS_LABELS, POOLED, bench_thread_switch


def test_every_served_decode_step_is_counted_once_by_its_place_in_a_row_and_in_time(
    byte_checkpoint: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: the thread policy has nothing to choose")
    ckpt, corpus = byte_checkpoint
    monkeypatch.setenv("MTP_COMPILE", "false")  # eager steps: compiled ones cost minutes to build
    steps: list[int] = []
    run = threads.ThreadPolicy.run

    def counted(policy: threads.ThreadPolicy, key: threads.Key, *args: object, **kwargs: object) -> object:
        steps.append(key[0] == "decode")
        return run(policy, key, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(threads.ThreadPolicy, "run", counted)
    r = bench_thread_switch(ckpt, corpus, requests=4, new_tokens=24, streams=2)
    assert threads.ThreadPolicy.run is counted  # the bench put back what it found
    by_size = r["by_size"]
    assert set(by_size) <= {"1", "2"} and "2" in by_size  # two streams at a time: batches of two
    served = 0
    for by in by_size.values():
        assert set(by) <= {"1", str(torch.get_num_threads())} and by
        for tables in by.values():
            in_a_row, in_time = tables["in_a_row"], tables["ms_into_run"]
            assert set(in_a_row) <= {*map(str, range(1, POOLED)), f"{POOLED}+"}
            assert set(in_time) <= set(MS_LABELS)
            counted_once = sum(row["passes"] for row in in_a_row.values())
            assert counted_once == sum(row["passes"] for row in in_time.values())
            assert all(row["ms_per_token"] > 0 for row in [*in_a_row.values(), *in_time.values()])
            served += counted_once
    assert 0 < served <= sum(steps)  # start-up's warm-up and timing steps are left out
    timings = r["thread_timings_at_end"]  # what /info shows the choices were made from
    assert set(timings) == {"cost_ms", "passes", "early_retimings"} and timings["early_retimings"] >= 0
