"""`python -m bench.overload`: one burst against a real server on a tiny model."""

import argparse
import asyncio
import gc
import re
from pathlib import Path

import pytest

from bench.overload import LOOP_ITSELF, burst, compared, profile_summary, profiled, steady
from bench.service import server


def test_a_burst_counts_refusals_and_the_load_generators_own_pauses(byte_checkpoint: tuple[str, str]) -> None:
    ckpt, _ = byte_checkpoint
    kept = [object()]  # alive when the server is ready: frozen, never scanned by a collection again
    with server(ckpt, "cpu", max_queue_size=2, max_batch_size=2, compile=False) as srv:
        assert gc.get_freeze_count() > 0 and not any(o is kept for o in gc.get_objects())
        r = asyncio.run(burst(srv.url, 12, 4))
    assert r["accepted_200"] + r["refused_429"] == 12 and r["refused_429"] > 0 and r["every_accepted_completed"]
    assert r["client_gc_collections"] >= 0 and r["client_gc_longest_ms"] >= 0
    assert (r["client_gc_collections"] == 0) == (r["client_gc_longest_ms"] == 0)


def test_a_profiled_burst_says_where_the_servers_event_loop_spent_its_time(
    byte_checkpoint: tuple[str, str], tmp_path: Path
) -> None:
    ckpt, _ = byte_checkpoint
    raw = tmp_path / "overload.spy"
    with server(ckpt, "cpu", max_queue_size=2, max_batch_size=2, compile=False) as srv:
        try:
            with profiled(srv.proc.pid, str(raw), 1000):
                for _ in range(4):
                    asyncio.run(burst(srv.url, 40, 4))
        except SystemExit as exc:  # no ptrace rights here (py-spy itself is a dependency)
            pytest.skip(str(exc))
    summary = profile_summary(str(raw), 1000, 4, top=None)  # a cut at 12 falls among equal counts
    threads = summary["threads_ms_per_burst"]
    assert threads["MainThread"] > 0  # the event loop answered 160 requests
    functions = summary["event_loop_functions_ms_per_burst"]
    assert functions.get("RequestContext.__call__ (app/api/middleware.py)", 0) > 0, functions
    assert not any("runpy" in f for f in functions)  # the frames every stack shares are left out
    assert all(ms <= threads["MainThread"] for ms in functions.values())
    lines = summary["event_loop_lines_ms_per_burst"]
    assert any(re.search(r":\d+\)$", line) for line in lines)  # where the samples ended, by source line
    # py-spy samples without stopping the process (--nonblocking), and now and then misreads a
    # frame it caught mid-change: no line, or a garbage one ("client (server:-233941584)" in CI)
    assert all(line == LOOP_ITSELF or re.search(r" \(.+\)$", line) for line in lines)


def test_the_profile_summary_counts_each_function_once_per_sample_and_strips_the_shared_frames(
    tmp_path: Path,
) -> None:
    entry = "main (app/cli/main.py:10);Runner.run (asyncio/runners.py:118)"
    raw = tmp_path / "raw.txt"
    raw.write_text(
        f"thread (0x1): MainThread;{entry} 30\n"  # in the loop's own code
        f"thread (0x1): MainThread;{entry};f (a.py:1);g (a.py:5);f (a.py:2) 20\n"  # f recursive: once
        "thread (0x1): MainThread;g (a.py:6) 10\n"  # truncated by the sampler: inner frames only
        "thread (0x2): mtp-worker_0;run (core.py:1) 40\n"
    )
    s = profile_summary(str(raw), rate=100, bursts=2)  # a sample is 10 ms; per burst: 5 ms
    assert s["threads_ms_per_burst"] == {"MainThread": 300.0, "mtp-worker_0": 200.0}
    assert s["event_loop_functions_ms_per_burst"] == {"g (a.py)": 150.0, "f (a.py)": 100.0}
    assert s["event_loop_lines_ms_per_burst"] == {LOOP_ITSELF: 150.0, "f (a.py:2)": 100.0, "g (a.py:6)": 50.0}


def test_a_comparison_alternates_this_trees_server_and_a_baselines(
    byte_checkpoint: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt, _ = byte_checkpoint
    monkeypatch.setenv("MTP_COMPILE", "false")  # the servers inherit MTP_*
    args = argparse.Namespace(
        checkpoint=ckpt, queue=2, max_batch=2, factor=6, new_tokens=4, bursts=1, profile=None, profile_rate=1000
    )
    out = compared(argparse.Namespace(**vars(args), baseline="HEAD", rounds=1))
    assert out["baseline"] == "HEAD" and set(out["phases"]) == {"this", "baseline"}
    for runs in out["phases"].values():
        (only,) = runs
        assert only["refusals"] > 0 and only["every_accepted_completed"] and only["ready_after_every_burst"]
    med = out["median_of_phases"]
    ratio = med["this"]["refusal_latency_p99_ms"] / med["baseline"]["refusal_latency_p99_ms"]
    assert out["p99_this_over_baseline"] == round(ratio, 3)


def test_steady_probes_meet_a_full_queue_one_at_a_time(byte_checkpoint: tuple[str, str]) -> None:
    ckpt, _ = byte_checkpoint
    with server(ckpt, "cpu", max_queue_size=2, max_batch_size=2, compile=False) as srv:
        r = asyncio.run(steady(srv.url, queue=2, max_batch=2, rate=20, seconds=3.0, new_tokens=100))
    assert r["probes"] == 60 and r["refused_429"] + r["accepted_200"] == 60 and not r["other"]
    assert r["refused_429"] > r["accepted_200"]  # the fillers kept the queue full
    assert r["fill_requests"].get(200, 0) > 0
    # this model's 100 tokens take a moment: a place may be between two fillers when the gauges are read
    assert r["gauge_samples"] >= 3 and r["running_sequences_median"] == 2 and r["queue_depth_median"] >= 1
    assert 0 < r["refusal_latency_p50_ms"] <= r["refusal_latency_p99_ms"] <= r["refusal_latency_max_ms"]
