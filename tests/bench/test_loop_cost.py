"""The event loop's CPU per request (bench.loop_cost): read from the server's main thread, per load."""

import os
import time

from bench.loop_cost import bench_loop_cost, main_thread_ms
from bench.server import thread_times


def test_main_thread_ms_reads_the_cpu_time_the_main_thread_spent() -> None:
    pid = os.getpid()  # this process: pytest's main thread is the one whose id is the pid
    before, t0 = thread_times(pid), time.thread_time()
    while time.thread_time() - t0 < 0.3:
        pass
    spent = (time.thread_time() - t0) * 1e3
    ms = main_thread_ms(pid, before, thread_times(pid))
    assert ms is not None and abs(ms - spent) <= 30  # /proc counts in 10 ms ticks, at each end
    assert main_thread_ms(pid, None, before) is None


def test_each_load_gets_the_loops_cpu_per_request_from_a_real_server(byte_checkpoint: tuple[str, str]) -> None:
    ckpt, corpus = byte_checkpoint
    # 8 clients of 6 requests each: enough of the loop's CPU (about 80 ms) that /proc's 10 ms
    # ticks, which sample it, never read none (at 2 clients the JSON load got about 2 ticks)
    r = bench_loop_cost(ckpt, corpus, None, rounds=1, clients=2, streams=8, seconds=1.0)
    assert "this_over_baseline" not in r  # nothing to set it against
    (phase,) = r["phases"]["this"]
    assert phase["predict"]["requests"] > 0 and phase["predict"]["errors"] == 0
    for load in ("generate_json", "generate_sse"):
        assert phase[load]["sequences"] == 8 * 6 and phase[load]["errors"] == 0  # 8 clients, ROUNDS each
    for load in ("predict", "generate_json", "generate_sse"):
        ms = phase[load]["loop_ms_per_request"]
        assert ms is not None and ms > 0  # every request costs the loop something
        assert r["loop_ms_per_request"]["this"][load] == ms  # one round: its figure is the median
        assert 0 < phase[load]["loop_cores"] <= 1.05
