"""Overload: a burst of 10x the queue capacity against a real server.

    python -m bench.overload --queue 32 --factor 10 --bursts 8

Prints JSON, per burst: how many were accepted (200) and refused (429), the 429 latency
(p50/p99), whether every accepted request completed, /ready right after the burst, and this
process's own garbage-collection pauses during it (a pause here delays every request in
flight, and would read as the server's latency); then
the 429 latency p50/p99 over the refusals of all bursts, and the worst burst's p99. Bursts
are 2 s apart, each after the last one drained.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from typing import Any

import httpx

from app.config import DEFAULT_CHECKPOINT
from bench.decoding import write_json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--queue", type=int, default=32, help="max_queue_size of the server")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--bursts", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = []
    with server(args.checkpoint, "cpu", max_queue_size=args.queue, max_batch_size=16) as srv:
        url = srv.url
        for i in range(args.bursts):
            if i:
                time.sleep(2.0)
            runs.append(asyncio.run(burst(url, args.queue * args.factor, args.new_tokens)))
    pooled = [t for r in runs for t in r.pop("refusal_latencies_s")]
    result = {
        "max_queue_size": args.queue,
        "bursts": runs,
        "refusals": len(pooled),
        "refusal_latency_p50_ms": round(pct(pooled, 0.5) * 1000, 2),
        "refusal_latency_p99_ms": round(pct(pooled, 0.99) * 1000, 2),
        "worst_burst_refusal_latency_p99_ms": max(r["refusal_latency_p99_ms"] for r in runs),
        "client_gc_longest_ms": max(r["client_gc_longest_ms"] for r in runs),
        "every_accepted_completed": all(r["every_accepted_completed"] for r in runs),
        "ready_after_every_burst": all(r["ready_after"] == 200 for r in runs),
    }
    write_json(result, args.out)


if __name__ == "__main__":
    main()
