"""`python -m bench.thread_switch`: decode steps by batch size, thread count and place in a run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.engine import threads
from bench.server import ROOT
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
    assert set(timings) == {"cost_ms", "passes", "early_retimings", "moves"}


def test_forced_runs_set_the_batch_1_steps_thread_count(
    byte_checkpoint: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--forced K,M: batch-1 steps run K at one thread, then M at every thread, whatever the policy
    would choose, so no run of one count is longer than its share."""
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: nothing to force")
    ckpt, corpus = byte_checkpoint
    monkeypatch.setenv("MTP_COMPILE", "false")
    choose = threads.ThreadPolicy.choose
    r = bench_thread_switch(ckpt, corpus, requests=2, new_tokens=40, forced=(3, 2))
    assert threads.ThreadPolicy.choose is choose  # put back
    assert r["forced"] == [3, 2]
    batch_1 = r["by_size"]["1"]
    assert set(batch_1) == {"1", str(torch.get_num_threads())}  # both counts ran
    assert max(int(k) for k in batch_1["1"]["in_a_row"]) <= 3
    assert max(int(k) for k in batch_1[str(torch.get_num_threads())]["in_a_row"]) <= 2


def test_over_http_the_steps_of_a_real_server_are_recorded(byte_checkpoint: tuple[str, str], tmp_path: Path) -> None:
    """--http: `mtp serve`'s own server in the bench's process, and a client process over SSE."""
    ckpt, corpus = byte_checkpoint
    out = tmp_path / "switch.json"
    cmd = [sys.executable, "-m", "bench.thread_switch", "--checkpoint", ckpt, "--corpus", corpus, "--http"]
    cmd += ["--requests", "3", "--new-tokens", "24", "--out", str(out)]
    env = {**os.environ, "MTP_COMPILE": "false"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    r = json.loads(out.read_text())
    assert r["http"] is True and r["requests"] == 3
    steps = sum(row["passes"] for by in r["by_size"].values() for t in by.values() for row in t["in_a_row"].values())
    assert steps >= 3 * 23 // 4  # every decode step of the 3 requests: at most k = 4 tokens each
    assert set(r["thread_timings_at_end"]) == {"cost_ms", "passes", "early_retimings", "moves"}
