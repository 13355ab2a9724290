"""What a second busy thread in the process costs a batched /predict pass: the GIL, or the cores?

    python -m bench.side_load [--batch 16] [--duty 0.3] [--seconds 5] [--rounds 2]

In the server the event loop shares the process with the inference thread, which runs a
/predict pass on every core (one OpenMP team). Under load the loop keeps part of a core busy
with Python: parsing requests, tokenizing, writing replies. That could slow the pass in two
ways: by holding the GIL, which the inference thread needs between ops of an eager pass, or
by taking a core from the team, whose threads wait at each op's barrier for a descheduled
member. A pass that ran without the GIL (a compiled one, say) would only remove the first.

This runs score_next in process on batches of --batch held-out prompts, one phase at a time,
in alternating rounds:
  - alone;
  - beside a thread that spins in Python (holding the GIL) --duty of every 2 ms and sleeps
    the rest, as the loop does under load;
  - beside a thread that keeps a core as busy, for as long, without the GIL (SHA-256 of a
    buffer sized to take that long: hashlib lets the GIL go for it).
It prints each phase's requests/s, the side thread's measured CPU share, and the ratios to
alone against the pro-rata share 1 - duty / threads (what the pass would keep if the side
thread's CPU came out of its cores in proportion, and nothing else were lost).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from app import config
from app.model.checkpoint import load_checkpoint
from app.serve import SWITCH_INTERVAL_S
from bench.decoding import heldout_prompts, write_json
from bench.service import inprocess_predict_rate

PERIOD_S = 0.002  # the side thread's cycle: busy for duty of it, then asleep
CALIBRATION = b"\0" * (1 << 20)
MODES = ("alone", "gil", "nogil")


def _spin_python(until: float) -> None:
    while time.perf_counter() < until:
        pass


def _native_buffer(seconds: float) -> bytes:
    """A buffer whose SHA-256 takes about `seconds`: hashlib lets the GIL go while it hashes
    (above 2 KiB), so one call is the whole busy span, and the thread takes the GIL once a
    cycle, as the Python spinner does (a small buffer hashed in a loop took the GIL back after
    each call, and waited for it each time)."""
    best = min(_timed_hash(CALIBRATION) for _ in range(3))
    return b"\0" * max(1 << 12, int(len(CALIBRATION) * seconds / best))


def _timed_hash(data: bytes) -> float:
    t0 = time.perf_counter()
    hashlib.sha256(data).digest()
    return time.perf_counter() - t0


@contextlib.contextmanager
def side_thread(mode: str, duty: float) -> Iterator[dict[str, float]]:
    """A thread busy for `duty` of every PERIOD_S while the block runs: in Python (mode "gil")
    or in C without the GIL ("nogil"); "alone" starts none. Yields a dict that gets, when the
    block ends, the cores the thread used (its CPU time over the block's wall time)."""
    used: dict[str, float] = {}
    if mode == "alone":
        yield used
        used["side_cores"] = 0.0
        return
    stop = threading.Event()
    cpu: list[float] = []
    buffer = _native_buffer(duty * PERIOD_S) if mode == "nogil" else b""

    def run() -> None:
        t0 = time.thread_time()
        while not stop.is_set():
            if buffer:
                hashlib.sha256(buffer).digest()
            else:
                _spin_python(time.perf_counter() + duty * PERIOD_S)
            time.sleep((1 - duty) * PERIOD_S)
        cpu.append(time.thread_time() - t0)

    worker = threading.Thread(target=run, name=f"side-{mode}", daemon=True)
    t0 = time.perf_counter()
    worker.start()
    try:
        yield used
    finally:
        stop.set()
        worker.join()
        used["side_cores"] = round(cpu[0] / (time.perf_counter() - t0), 3)


def bench_side_load(
    checkpoint: str, corpus: str, batch: int = 16, duty: float = 0.3, seconds: float = 5.0, rounds: int = 2
) -> dict[str, Any]:
    if not 0 < duty < 1:
        raise ValueError("duty must be between 0 and 1")
    model, tok = load_checkpoint(checkpoint)
    prompts = heldout_prompts(corpus, tok, 64, 32, seed=1)
    threads = torch.get_num_threads()
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    side: dict[str, list[float]] = {m: [] for m in MODES}
    inprocess_predict_rate(model, prompts, batch, 1.0)  # warm: the first passes allocate
    interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)  # the server's: how soon a thread waiting for the GIL gets it
    try:
        for _ in range(rounds):
            for mode in MODES:
                with side_thread(mode, duty) as used:
                    rate = inprocess_predict_rate(model, prompts, batch, seconds)
                rates[mode].append(round(rate, 1))
                side[mode].append(used["side_cores"])
    finally:
        sys.setswitchinterval(interval)
    alone = statistics.median(rates["alone"])
    return {
        "benchmark": "side_load",
        "checkpoint": checkpoint,
        "batch": batch,
        "duty": duty,
        "period_ms": PERIOD_S * 1000,
        "torch_threads": threads,
        "switch_interval_ms": SWITCH_INTERVAL_S * 1000,
        "requests_per_s": rates,
        "side_thread_cores": side,
        "ratios": {
            "gil_over_alone": round(statistics.median(rates["gil"]) / alone, 3),
            "nogil_over_alone": round(statistics.median(rates["nogil"]) / alone, 3),
            "pro_rata": round(1 - duty / threads, 3),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT))
    parser.add_argument("--corpus", default=str(config.DEFAULT_CORPUS))
    parser.add_argument("--batch", type=int, default=16, help="prompts per pass (the served mean batch)")
    parser.add_argument("--duty", type=float, default=0.3, help="the side thread's busy share of each 2 ms")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", help="also write the JSON here")
    a = parser.parse_args()
    write_json(bench_side_load(a.checkpoint, a.corpus, a.batch, a.duty, a.seconds, a.rounds), a.out)


if __name__ == "__main__":
    main()
