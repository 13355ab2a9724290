"""What a decode step costs after the thread policy switches counts: by passes in a row.

    python -m bench.thread_switch [--checkpoint DIR] [--requests 12] [--new-tokens 200] [--out FILE]

Starts the service's engine in this process (the app's lifespan: default settings, so compiled
steps and both policies, on the machine's threads), then serves `requests` greedy /generate
requests one after another (held-out prompts of 32 tokens). Every batch-1 decode step the thread
policy runs is recorded with its thread count, its time per expected token (what the policy
compares) and how many passes of the same count and graph in a row it ends (1: the first after
a switch, a prefill or another draft count). Prints, per thread count, the median cost per
expected token by passes in a row (6 and more pooled), and each position's ratio to the pooled
one: how many passes a re-timing must leave untimed before its timings stand for the count.
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


def bench_thread_switch(checkpoint: str, corpus: str, requests: int, new_tokens: int) -> dict[str, Any]:
    tok = load_tokenizer(checkpoint)
    prompts = heldout_prompts(corpus, tok, 8, 32, seed=1)
    passes: list[tuple[int, int, float]] = []  # (threads, passes in a row, ms per expected token)
    run = threads.ThreadPolicy.run
    last: list[Any] = [None, 0]

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
        if key == ("decode", 1):
            ran = (policy.current, graph() if graph is not None else None)
            last[1] = last[1] + 1 if last[0] == ran else 1
            last[0] = ran
            passes.append((policy.current, last[1], seconds * 1e3 / (work() if work is not None else 1.0)))
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
                for i in range(requests):
                    async for _ in engine.generate(GenerateJob(prompts[i % len(prompts)], max_new_tokens=new_tokens)):
                        pass
                return dict(engine.info())

        info = asyncio.run(serve())
    finally:
        threads.ThreadPolicy.run = run  # type: ignore[method-assign]
        threads.ThreadPolicy.run_like = run_like  # type: ignore[method-assign]
    by: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for n, streak, ms in passes:
        by[n][min(streak, POOLED)].append(ms)
    out: dict[str, Any] = {
        "benchmark": "thread_switch",
        "checkpoint": checkpoint,
        "requests": requests,
        "new_tokens": new_tokens,
        "threads_at_end": info.get("threads"),
        "by_threads": {},
    }
    for n in sorted(by):
        warm = statistics.median(by[n][POOLED]) if by[n].get(POOLED) else None
        out["by_threads"][str(n)] = {
            str(streak) if streak < POOLED else f"{POOLED}+": {
                "passes": len(costs),
                "ms_per_token": round(statistics.median(costs), 4),
                "over_warm": round(statistics.median(costs) / warm, 2) if warm else None,
            }
            for streak, costs in sorted(by[n].items())
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT))
    parser.add_argument("--corpus", default=str(config.DEFAULT_CORPUS))
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--out", help="also write the JSON here")
    a = parser.parse_args()
    write_json(bench_thread_switch(a.checkpoint, a.corpus, a.requests, a.new_tokens), a.out)


if __name__ == "__main__":
    main()
