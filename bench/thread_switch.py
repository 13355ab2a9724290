"""What a decode step costs after the thread policy switches counts: by passes in a row, and by time.

    python -m bench.thread_switch [--checkpoint DIR] [--requests 12] [--streams 1] [--new-tokens 200] [--out FILE]

Starts the service's engine in this process (the app's lifespan: default settings, so compiled
steps and both policies, on the machine's threads), then serves `requests` greedy /generate
requests (held-out prompts of 32 tokens), `streams` at a time. Every decode step the thread
policy runs is recorded with its batch size, its thread count, its time per expected token (what
the policy compares), how many passes of the same size, count and graph in a row it ends (1: the
first after a switch, a prefill, another batch size or another draft count) and how long that
run had lasted when it started. Prints, per batch size and thread count, the median cost per
expected token by passes in a row (6 and more pooled) and by milliseconds into the run, and each
one's ratio to the pooled passes: how long a re-timing must leave untimed before its timings
stand for the count, in passes and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Hashable
from pathlib import Path
from typing import Any, TypeVar

from app import config
from app.config import Settings
from app.engine import threads
from app.engine.types import GenerateJob
from app.main import create_app
from app.model.checkpoint import load_tokenizer
from bench.decoding import heldout_prompts, write_json

T = TypeVar("T")
POOLED = 6  # passes in a row from this one on are pooled: warm
MS_EDGES = (0.5, 1.0, 2.0, 4.0, 8.0)  # milliseconds into a run of passes: the buckets' upper edges
MS_LABELS = [f"{lo:g}-{hi:g}" for lo, hi in zip((0.0, *MS_EDGES), MS_EDGES, strict=False)] + [f"{MS_EDGES[-1]:g}+"]


def table(costs: dict[str, list[float]], warm: float | None) -> dict[str, dict[str, Any]]:
    return {
        label: {
            "passes": len(values),
            "ms_per_token": round(statistics.median(values), 4),
            "over_warm": round(statistics.median(values) / warm, 2) if warm else None,
        }
        for label, values in costs.items()
    }


def bench_thread_switch(
    checkpoint: str, corpus: str, requests: int, new_tokens: int, streams: int = 1
) -> dict[str, Any]:
    tok = load_tokenizer(checkpoint)
    prompts = heldout_prompts(corpus, tok, 8, 32, seed=1)
    # (batch size, threads, passes in a row, ms into the run, ms per expected token)
    passes: list[tuple[int, int, int, float, float]] = []
    run = threads.ThreadPolicy.run
    last: list[Any] = [None, 0, 0.0]  # what the last decode pass ran, its place in a row, the row's start

    def recorded(
        policy: threads.ThreadPolicy,
        key: threads.Key,
        fn: Callable[[], T],
        allowed: Collection[int] | None = None,
        graph: Callable[[], Hashable] | None = None,
        work: Callable[[], float] | None = None,
    ) -> T:
        t0 = time.perf_counter()
        result = run(policy, key, fn, allowed, graph, work)
        seconds = time.perf_counter() - t0
        if key[0] == "decode":
            ran = (key, policy.current, graph() if graph is not None else None)
            if last[0] == ran:
                last[1] += 1
            else:
                last[1], last[2] = 1, t0
            last[0] = ran
            per_token = seconds * 1e3 / (work() if work is not None else 1.0)
            passes.append((key[1], policy.current, last[1], (t0 - last[2]) * 1e3, per_token))
        return result

    def interrupted(policy: threads.ThreadPolicy, key: threads.Key, fn: Callable[[], T]) -> T:
        last[0] = None  # a prefill between two decode steps: the next is the first in a row
        return run_like(policy, key, fn)

    run_like = threads.ThreadPolicy.run_like
    threads.ThreadPolicy.run = recorded  # type: ignore[method-assign,assignment]
    threads.ThreadPolicy.run_like = interrupted  # type: ignore[method-assign,assignment]
    try:

        async def serve() -> dict[str, Any]:
            app = create_app(Settings(checkpoint=Path(checkpoint)))  # and the MTP_* variables
            async with app.router.lifespan_context(app):
                engine = app.state.service.engine
                passes.clear()  # start-up's warm-up and timing steps are not served ones

                async def stream(first: int) -> None:
                    for i in range(first, requests, streams):
                        job = GenerateJob(prompts[i % len(prompts)], max_new_tokens=new_tokens)
                        async for _ in engine.generate(job):
                            pass

                await asyncio.gather(*(stream(s) for s in range(streams)))
                return dict(engine.info())

        info = asyncio.run(serve())
    finally:
        threads.ThreadPolicy.run = run  # type: ignore[method-assign]
        threads.ThreadPolicy.run_like = run_like  # type: ignore[method-assign]
    in_a_row: dict[tuple[int, int], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    into: dict[tuple[int, int], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for size, n, streak, ms_into, per_token in passes:
        in_a_row[size, n][min(streak, POOLED)].append(per_token)
        into[size, n][sum(ms_into >= edge for edge in MS_EDGES)].append(per_token)
    out: dict[str, Any] = {
        "benchmark": "thread_switch",
        "checkpoint": checkpoint,
        "requests": requests,
        "streams": streams,
        "new_tokens": new_tokens,
        "threads_at_end": info.get("threads"),
        "thread_timings_at_end": info.get("thread_timings"),  # early_retimings: started by the chosen count's drift
        "by_size": {},
    }
    for size, n in sorted(in_a_row):
        rows = in_a_row[size, n]
        warm = statistics.median(rows[POOLED]) if rows.get(POOLED) else None
        out["by_size"].setdefault(str(size), {})[str(n)] = {
            "in_a_row": table({str(k) if k < POOLED else f"{POOLED}+": v for k, v in sorted(rows.items())}, warm),
            "ms_into_run": table({MS_LABELS[k]: v for k, v in sorted(into[size, n].items())}, warm),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT))
    parser.add_argument("--corpus", default=str(config.DEFAULT_CORPUS))
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--streams", type=int, default=1, help="requests served at a time")
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--out", help="also write the JSON here")
    a = parser.parse_args()
    write_json(bench_thread_switch(a.checkpoint, a.corpus, a.requests, a.new_tokens, a.streams), a.out)


if __name__ == "__main__":
    main()
