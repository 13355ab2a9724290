"""Overload: a burst of 10x the queue capacity against a real server.

    python -m bench.overload --queue 32 --factor 10 --bursts 8

Prints JSON, per burst: how many were accepted (200) and refused (429), the 429 latency
(p50/p99), whether every accepted request completed, /ready right after the burst, and this
process's own garbage-collection pauses during it (a pause here delays every request in
flight, and would read as the server's latency); then
the 429 latency p50/p99 over the refusals of all bursts, and the worst burst's p99. Bursts
are 2 s apart, each after the last one drained.

    python -m bench.overload --profile /tmp/overload.spy

also samples the server with py-spy (every thread, without pausing it, at --profile-rate Hz)
for as long as the bursts run, and adds to the JSON where its CPU time went, in ms per burst:
per thread, and on the event loop's thread per function (inclusive) and per source line
(where the sample ended). The raw stacks stay in the file. The sampler shares the machine's
cores: take the latency figures from a run without it.

    python -m bench.overload --baseline GIT_REF [--rounds 2]

runs the same bursts against this tree's server and GIT_REF's (a git worktree), one server up
at a time in alternating phases (A, B, A, B), and adds the medians of their phases and the
ratio of their p99s.

    python -m bench.overload --steady 20 --seconds 20 [--new-tokens 200]

measures the door another way: a burst's last refusals wait behind its first, so its p99 is
mostly the time to get through the burst. Here clients keep the batch and the queue full for
the whole run, and /predict probes arrive one at a time, RATE a second; each meets a full queue.
It prints their refusal latency and the running and waiting gauges read once a second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from app.config import DEFAULT_CHECKPOINT
from bench.decoding import write_json
from bench.server import ROOT, baseline_tree, progress
from bench.service import pct, raw_post, read_response, server


async def burst(url: str, n: int, new_tokens: int) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    ok: list[float] = []
    refused: list[float] = []
    other: list[str] = []
    retry_after: set[str] = set()
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(n)]
    reqs = [
        raw_post("/predict", {"inputs": f"ROMEO {i}:", "top_n": 3})
        if i % 2
        else raw_post("/generate", {"inputs": f"JULIET {i}:", "parameters": {"max_new_tokens": new_tokens}})
        for i in range(n)
    ]

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        status, headers, body = await read_response(*conns[i], reqs[i])
        dt = time.perf_counter() - t0
        if status == 200:
            ok.append(dt)
        elif status == 429:
            refused.append(dt)
            retry_after.add(headers.get("retry-after", ""))
        else:
            other.append(f"{status} {body[:120]!r}")

    pauses: list[float] = []  # this process's garbage collections during the burst, in seconds
    started = [0.0]

    def gc_pause(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - started[0])

    gc.callbacks.append(gc_pause)
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        gc.callbacks.remove(gc_pause)
    wall = time.perf_counter() - t0
    for _, writer in conns:
        writer.close()
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        ready = (await http.get("/ready")).status_code
        metrics = (await http.get("/metrics")).text
    gauges = {
        line.split()[0]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith(("mtp_queue_depth ", "mtp_running_sequences "))
    }
    return {
        "burst": n,
        "accepted_200": len(ok),
        "refused_429": len(refused),
        "other": other[:10],
        "every_accepted_completed": not other,
        "refusal_latencies_s": refused,
        "refusal_latency_p50_ms": round(pct(refused, 0.5) * 1000, 2),
        "refusal_latency_p99_ms": round(pct(refused, 0.99) * 1000, 2),
        "accepted_latency_p99_ms": round(pct(ok, 0.99) * 1000, 1),
        "retry_after": sorted(retry_after),
        "wall_s": round(wall, 2),
        # a pause of the load generator delays every request in flight: a latency it measures,
        # not the server's (bench.server.running freezes this process's heap for that reason)
        "client_gc_collections": len(pauses),
        "client_gc_longest_ms": round(max(pauses, default=0.0) * 1000, 2),
        "ready_after": ready,
        "gauges_after": gauges,
    }


async def steady(url: str, queue: int, max_batch: int, rate: float, seconds: float, new_tokens: int) -> dict[str, Any]:
    """The door's answer while the core runs full batches, one refusal at a time.

    A burst's p99 is mostly how long the server (and this client) take to get through the burst
    itself: its last refusals wait behind the first. Here `max_batch + queue` keep-alive clients
    keep the engine's batch and its queue full (each sends its next /generate as soon as the last
    is answered), and /predict probes arrive at `rate` a second, each on a keep-alive connection
    from a pool of 8, so each one meets a full queue and little else. A probe's latency runs from the
    moment it was due, not from when a connection was free to send it (no coordinated omission).
    The running and waiting gauges are read once a second: they show whether the core was full."""
    host, port = url.removeprefix("http://").split(":")
    fill = raw_post("/generate", {"inputs": "ROMEO:", "parameters": {"max_new_tokens": new_tokens}})
    probe = raw_post("/predict", {"inputs": "JULIET:", "top_n": 3})
    stop = time.perf_counter() + 1.0 + seconds  # a second for the fillers to get in, then the probes
    filled: Counter[int] = Counter()
    refused: list[float] = []
    accepted: list[float] = []
    other: list[str] = []
    gauges: list[tuple[float, float]] = []

    async def filler() -> None:
        conn = await asyncio.open_connection(host, int(port))
        while time.perf_counter() < stop:
            status, _, _ = await read_response(*conn, fill)
            filled[status] += 1
            if status == 429:  # a probe took the place: try again shortly
                await asyncio.sleep(0.01)
        conn[1].close()

    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(8):
        pool.put_nowait(await asyncio.open_connection(host, int(port)))

    async def one(due: float) -> None:
        conn = await pool.get()
        status, _, body = await read_response(*conn, probe)
        dt = time.perf_counter() - due
        pool.put_nowait(conn)
        if status == 429:
            refused.append(dt)
        elif status == 200:
            accepted.append(dt)
        else:
            other.append(f"{status} {body[:120]!r}")

    async def watch() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while time.perf_counter() < stop:
                text = (await http.get("/metrics")).text
                g = {ln.split()[0]: float(ln.split()[-1]) for ln in text.splitlines() if not ln.startswith("#") and ln}
                gauges.append((g.get("mtp_running_sequences", 0.0), g.get("mtp_queue_depth", 0.0)))
                await asyncio.sleep(1.0)

    fillers = [asyncio.create_task(filler()) for _ in range(max_batch + queue)]
    await asyncio.sleep(1.0)  # the fillers are in
    watcher = asyncio.create_task(watch())
    probes = []
    t0 = time.perf_counter()
    i = 0
    while (due := t0 + i / rate) < stop:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        probes.append(asyncio.create_task(one(due)))
        i += 1
    await asyncio.gather(*probes, *fillers, watcher)
    while not pool.empty():
        pool.get_nowait()[1].close()
    running = [r for r, _ in gauges]
    waiting = [w for _, w in gauges]
    return {
        "mode": "steady",
        "max_queue_size": queue,
        "max_batch_size": max_batch,
        "probe_rate_per_s": rate,
        "seconds": seconds,
        "probes": i,
        "refused_429": len(refused),
        "accepted_200": len(accepted),
        "other": other[:10],
        "refusal_latency_p50_ms": round(pct(refused, 0.5) * 1000, 2),
        "refusal_latency_p99_ms": round(pct(refused, 0.99) * 1000, 2),
        "refusal_latency_max_ms": round(max(refused, default=float("nan")) * 1000, 2),
        "fill_requests": dict(filled),
        "running_sequences_median": statistics.median(running) if running else None,
        "queue_depth_median": statistics.median(waiting) if waiting else None,
        "gauge_samples": len(gauges),
    }


@contextlib.contextmanager
def profiled(pid: int, path: str, rate: int) -> Iterator[None]:
    """py-spy samples process pid (every thread, not pausing it) while the block runs; raw stacks go to path."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--profile needs py-spy (pip install -e '.[bench]')")
    cmd = [spy, "record", "--pid", str(pid), "--rate", str(rate), "--threads", "--nonblocking"]
    proc = subprocess.Popen([*cmd, "--format", "raw", "--output", path], stdout=subprocess.DEVNULL)
    time.sleep(1.0)  # attached and sampling
    if proc.poll() is not None:
        raise SystemExit(f"py-spy exited with {proc.returncode} (attaching to a process needs ptrace rights)")
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        proc.wait(timeout=60)


_LINE = re.compile(r":\d+\)$")
LOOP_ITSELF = "(the event loop itself: polling, socket I/O and callbacks below Python)"


def profile_summary(path: str, rate: int, bursts: int, top: int | None = 12) -> dict[str, Any]:
    """Sampled CPU time in ms per burst: per thread, and on the event loop's thread (MainThread)
    per function, inclusive, and per source line where the samples ended (the top ones; all of
    them with `top=None`). The frames every event-loop sample shares (the command's entry down to
    the loop's run) are left out; a sample that ended there was in the loop's own code."""
    scale = 1000.0 / rate / bursts
    threads: Counter[str] = Counter()
    loop: list[tuple[list[str], int]] = []
    for row in Path(path).read_text().splitlines():
        stack, _, count = row.rpartition(" ")
        frames = stack.split(";")
        name = frames[0].partition(": ")[2] or frames[0]  # "thread (0x7f..): MainThread"
        threads[name] += int(count)
        if name == "MainThread":
            loop.append((frames[1:], int(count)))
    # The frames the loop's stacks start with (the command's entry down to the loop's run): the
    # longest prefix shared by the stacks that start like most do. py-spy truncates a few
    # stacks at the outer end, which are all inner frames.
    starts = Counter(f[0] for f, _ in loop if f)
    group = [f for f, _ in loop if f and f[0] == starts.most_common(1)[0][0]] if starts else []
    shared = group[0] if group else []
    for f in group:
        n_same = next((i for i, (a, b) in enumerate(zip(shared, f, strict=False)) if a != b), min(len(shared), len(f)))
        shared = shared[:n_same]
    functions: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    for frames, n in loop:
        own = frames[len(shared) :] if frames[: len(shared)] == shared else frames
        if not own:  # ended in the shared frames: in the loop's own (native) code
            lines[LOOP_ITSELF] += n
            continue
        for fn in dict.fromkeys(_LINE.sub(")", f) for f in own):
            functions[fn] += n
        lines[own[-1]] += n

    def ms(counter: Counter[str], k: int | None = None) -> dict[str, float]:
        return {key: round(n * scale, 1) for key, n in counter.most_common(k)}

    return {
        "rate_hz": rate,
        "threads_ms_per_burst": ms(threads),
        "event_loop_functions_ms_per_burst": ms(functions, top),
        "event_loop_lines_ms_per_burst": ms(lines, top),
    }


def summary(queue: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's bursts, and their refusal latency pooled."""
    pooled = [t for r in runs for t in r.pop("refusal_latencies_s")]
    return {
        "max_queue_size": queue,
        "bursts": runs,
        "refusals": len(pooled),
        "refusal_latency_p50_ms": round(pct(pooled, 0.5) * 1000, 2),
        "refusal_latency_p99_ms": round(pct(pooled, 0.99) * 1000, 2),
        "worst_burst_refusal_latency_p99_ms": max(r["refusal_latency_p99_ms"] for r in runs),
        "client_gc_longest_ms": max(r["client_gc_longest_ms"] for r in runs),
        "every_accepted_completed": all(r["every_accepted_completed"] for r in runs),
        "ready_after_every_burst": all(r["ready_after"] == 200 for r in runs),
    }


def phase(args: argparse.Namespace, root: Path = ROOT) -> dict[str, Any]:
    """A server running root's `app` takes args.bursts bursts, 2 s apart."""
    runs = []
    with server(args.checkpoint, "cpu", root, max_queue_size=args.queue, max_batch_size=args.max_batch) as srv:
        spying = profiled(srv.proc.pid, args.profile, args.profile_rate) if args.profile else contextlib.nullcontext()
        with spying:
            for i in range(args.bursts):
                if i:
                    time.sleep(2.0)
                runs.append(asyncio.run(burst(srv.url, args.queue * args.factor, args.new_tokens)))
    return summary(args.queue, runs)


def compared(args: argparse.Namespace) -> dict[str, Any]:
    """This tree's server and the baseline's, in alternating phases (A, B, A, B), and the medians
    of their phases' figures."""
    trees = {"this": ROOT, "baseline": baseline_tree(args.baseline)}
    phases: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, root in trees.items():
            phases[name].append(progress("bench.overload", f"server {name}", phase(args, root)))
    keys = ("refusal_latency_p50_ms", "refusal_latency_p99_ms", "worst_burst_refusal_latency_p99_ms")
    med = {name: {key: statistics.median(p[key] for p in runs) for key in keys} for name, runs in phases.items()}
    p99 = "refusal_latency_p99_ms"
    return {
        "max_queue_size": args.queue,
        "baseline": args.baseline,
        "rounds": args.rounds,
        "median_of_phases": med,
        "p99_this_over_baseline": round(med["this"][p99] / med["baseline"][p99], 3),
        "every_accepted_completed": all(p["every_accepted_completed"] for runs in phases.values() for p in runs),
        "ready_after_every_burst": all(p["ready_after_every_burst"] for runs in phases.values() for p in runs),
        "phases": phases,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--queue", type=int, default=32, help="max_queue_size of the server")
    ap.add_argument("--max-batch", type=int, default=16, help="max_batch_size of the server")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--bursts", type=int, default=8)
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None, help="py-spy's raw stacks of the server go here (see above)")
    ap.add_argument("--profile-rate", type=int, default=1000, help="py-spy samples per second")
    ap.add_argument("--baseline", default=None, help="a git ref whose server to compare against (see above)")
    ap.add_argument("--rounds", type=int, default=2, help="with --baseline: alternating rounds of the two servers")
    ap.add_argument(
        "--steady",
        type=float,
        default=None,
        metavar="RATE",
        help="instead of bursts: keep the batch and the queue full and send RATE /predict probes a second (see above)",
    )
    ap.add_argument("--seconds", type=float, default=20.0, help="with --steady: how long the probes run")
    args = ap.parse_args()
    if args.steady is not None and (args.baseline or args.profile):
        ap.error("--steady runs alone: leave out --baseline and --profile")
    if args.steady is not None:
        with server(args.checkpoint, "cpu", max_queue_size=args.queue, max_batch_size=args.max_batch) as srv:
            write_json(
                asyncio.run(steady(srv.url, args.queue, args.max_batch, args.steady, args.seconds, args.new_tokens)),
                args.out,
            )
        return
    if args.baseline and args.profile:
        ap.error("--profile samples one server: leave out --baseline")
    if args.baseline:
        write_json(compared(args), args.out)
        return
    result = phase(args)
    if args.profile:
        result["profile"] = profile_summary(args.profile, args.profile_rate, args.bursts)
    write_json(result, args.out)


if __name__ == "__main__":
    main()
