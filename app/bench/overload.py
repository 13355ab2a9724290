"""Overload: a burst of 10x the queue capacity against a real server.

    python -m app.bench.overload --queue 32 --factor 10

Prints JSON: how many were accepted (200) and refused (429), the 429 latency (p50/p99),
whether every accepted request completed, and /ready right after the burst.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx

from app.bench.service import pct, server
from app.cli import DEFAULT_CHECKPOINT


async def burst(url: str, n: int, new_tokens: int) -> dict[str, Any]:
    ok: list[float] = []
    refused: list[float] = []
    other: list[str] = []
    retry_after: set[str] = set()
    start_gate = asyncio.Event()

    async def one(i: int, http: httpx.AsyncClient) -> None:
        await start_gate.wait()
        t0 = time.perf_counter()
        if i % 2:
            r = await http.post("/predict", json={"inputs": f"ROMEO {i}:", "top_n": 3})
        else:
            body = {"inputs": f"JULIET {i}:", "parameters": {"max_new_tokens": new_tokens}}
            r = await http.post("/generate", json=body)
        dt = time.perf_counter() - t0
        if r.status_code == 200:
            ok.append(dt)
        elif r.status_code == 429:
            refused.append(dt)
            retry_after.add(r.headers.get("retry-after", ""))
        else:
            other.append(f"{r.status_code} {r.text[:120]}")

    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as http:
        # open the connections first, so the burst measures the server and not TCP handshakes
        await asyncio.gather(*(http.get("/health") for _ in range(n)))
        tasks = [asyncio.create_task(one(i, http)) for i in range(n)]
        await asyncio.sleep(0.2)
        start_gate.set()
        t0 = time.perf_counter()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
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
        "refusal_latency_p50_ms": round(pct(refused, 0.5) * 1000, 2),
        "refusal_latency_p99_ms": round(pct(refused, 0.99) * 1000, 2),
        "accepted_latency_p99_ms": round(pct(ok, 0.99) * 1000, 1),
        "retry_after": sorted(retry_after),
        "wall_s": round(wall, 2),
        "ready_after": ready,
        "gauges_after": gauges,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    ap.add_argument("--queue", type=int, default=32, help="max_queue_size of the server")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with server(args.checkpoint, "cpu", max_queue_size=args.queue, max_batch_size=16) as (url, _):
        result = asyncio.run(burst(url, args.queue * args.factor, args.new_tokens))
    result["max_queue_size"] = args.queue
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
