"""`python -m bench.thread_switch`: batch-1 decode steps by passes in a row at each thread count."""

import pytest
import torch

from app.engine import threads
from bench.thread_switch import POOLED, bench_thread_switch


def test_every_served_decode_step_is_counted_once_by_its_place_in_a_row(
    byte_checkpoint: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: the thread policy has nothing to choose")
    ckpt, corpus = byte_checkpoint
    monkeypatch.setenv("MTP_COMPILE", "false")  # eager steps: compiled ones cost minutes to build
    steps: list[int] = []
    run = threads.ThreadPolicy.run

    def counted(policy: threads.ThreadPolicy, key: threads.Key, *args: object, **kwargs: object) -> object:
        steps.append(key == ("decode", 1))
        return run(policy, key, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(threads.ThreadPolicy, "run", counted)
    r = bench_thread_switch(ckpt, corpus, requests=3, new_tokens=24)
    assert threads.ThreadPolicy.run is counted  # the bench put back what it found
    by = r["by_threads"]
    assert set(by) <= {"1", str(torch.get_num_threads())} and by
    served = sum(row["passes"] for rows in by.values() for row in rows.values())
    assert 0 < served <= sum(steps)  # start-up's warm-up and timing steps are left out
    for rows in by.values():
        assert set(rows) <= {*map(str, range(1, POOLED)), f"{POOLED}+"}
        assert all(row["ms_per_token"] > 0 for row in rows.values())
