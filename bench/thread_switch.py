"""What a decode step costs after the thread policy switches counts: by passes in a row, and by time.

    python -m bench.thread_switch [--checkpoint DIR] [--requests 12] [--streams 1] [--new-tokens 200]
        [--forced K,M] [--http] [--pooled 6] [--out FILE]

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

--forced K,M runs batch-1 decode steps K at one thread, then M at every thread, in turn, so
that steps after a switch each way are many (the policy's own re-timings are a few per
thousand steps). --http serves as `mtp serve` does, in this process, to a client process that
streams over SSE, as bench.served's single stream: the event loop and the client share the
cores with the step's threads, which in process they do not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Hashable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from app import config
from app.config import Settings
from app.engine import threads
from app.engine.types import GenerateJob
from app.main import create_app
from app.model.checkpoint import load_tokenizer
from app.serve import serve
from bench.decoding import heldout_prompts, write_json
from bench.server import ROOT, free_port

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


CLIENT = """
import asyncio, json, sys
from bench.service import generate_load
url, texts, streams, new_tokens, rounds = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:6])
print(json.dumps(asyncio.run(generate_load(url, texts, streams, new_tokens, rounds))))
"""


def served_over_http(
    settings: Settings, texts: list[str], requests: int, streams: int, new_tokens: int, start: Callable[[], None]
) -> dict[str, Any]:
    """Serve the requests as `mtp serve` does (app.serve.serve, in this process, so the recording
    patches apply), sent by a client process (bench.service.generate_load over SSE): the event
    loop writes every token and the client parses it on the same cores, as in bench.served.
    start() is called once the server is ready. Returns /info at the end."""
    url = f"http://127.0.0.1:{settings.port}"
    info: dict[str, Any] = {}
    failed: list[BaseException] = []

    def drive() -> None:
        try:
            with httpx.Client(timeout=5.0) as client:
                deadline = time.monotonic() + 900  # a cold compile of the steps takes minutes
                while time.monotonic() < deadline:
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(f"{url}/ready").status_code == 200:
                            break
                    time.sleep(0.2)
                start()
                rounds = -(-requests // streams)
                args = [url, json.dumps(texts), str(streams), str(new_tokens), str(rounds)]
                env = {**os.environ, "PYTHONPATH": str(ROOT)}
                subprocess.run(
                    [sys.executable, "-c", CLIENT, *args], cwd=ROOT, env=env, check=True, capture_output=True
                )
                info.update(client.get(f"{url}/info").json())
        except BaseException as exc:  # reported after the server stops
            failed.append(exc)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # the server drains and serve() returns

    driver = threading.Thread(target=drive, name="bench-driver", daemon=True)
    driver.start()
    code = serve(settings)
    driver.join(timeout=30)  # it signalled the server to stop: it is ending now, unless the server ended first
    if failed:
        raise failed[0]
    if driver.is_alive() or not info:
        raise RuntimeError(f"the server stopped (exit code {code}) before the client's run ended")
    return info


def bench_thread_switch(
    checkpoint: str,
    corpus: str,
    requests: int,
    new_tokens: int,
    streams: int = 1,
    forced: tuple[int, int] | None = None,
    http: bool = False,
    pooled: int = POOLED,
) -> dict[str, Any]:
    """forced (k, m): batch-1 decode steps run k at one thread, then m at every thread, and so on,
    whatever the policy would choose (so the steps after a switch each way are many); http:
    serve over HTTP to a client process (served_over_http) instead of calling the engine."""
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

    schedule = itertools.cycle([1] * forced[0] + [0] * forced[1]) if forced else None

    def scheduled(policy: threads.ThreadPolicy, key: threads.Key, allowed: Collection[int] | None = None) -> int:
        n = choose(policy, key, allowed)
        if schedule is None or key != ("decode", 1) or len(policy.choices) < 2:
            return n
        return 1 if next(schedule) else policy.choices[-1]

    run_like, choose = threads.ThreadPolicy.run_like, threads.ThreadPolicy.choose
    threads.ThreadPolicy.run = recorded  # type: ignore[method-assign,assignment]
    threads.ThreadPolicy.run_like = interrupted  # type: ignore[method-assign,assignment]
    threads.ThreadPolicy.choose = scheduled  # type: ignore[method-assign,assignment]
    try:

        async def serve_in_process() -> dict[str, Any]:
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

        if http:
            texts = [tok.decode(p) for p in prompts]
            settings = Settings(checkpoint=Path(checkpoint), port=free_port(), log_level="WARNING")
            info = served_over_http(settings, texts, requests, streams, new_tokens, passes.clear)
        else:
            info = asyncio.run(serve_in_process())
    finally:
        threads.ThreadPolicy.run = run  # type: ignore[method-assign]
        threads.ThreadPolicy.run_like = run_like  # type: ignore[method-assign]
        threads.ThreadPolicy.choose = choose  # type: ignore[method-assign]
    in_a_row: dict[tuple[int, int], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    into: dict[tuple[int, int], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for size, n, streak, ms_into, per_token in passes:
        in_a_row[size, n][min(streak, pooled)].append(per_token)
        into[size, n][sum(ms_into >= edge for edge in MS_EDGES)].append(per_token)
    out: dict[str, Any] = {
        "benchmark": "thread_switch",
        "checkpoint": checkpoint,
        "requests": requests,
        "streams": streams,
        "new_tokens": new_tokens,
        "forced": list(forced) if forced else None,
        "http": http,
        "threads_at_end": info.get("threads"),
        "thread_timings_at_end": info.get("thread_timings"),  # early_retimings: started by the chosen count's drift
        "by_size": {},
    }
    for size, n in sorted(in_a_row):
        rows = in_a_row[size, n]
        warm = statistics.median(rows[pooled]) if rows.get(pooled) else None
        out["by_size"].setdefault(str(size), {})[str(n)] = {
            "in_a_row": table({str(k) if k < pooled else f"{pooled}+": v for k, v in sorted(rows.items())}, warm),
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
    parser.add_argument(
        "--forced", metavar="K,M", help="batch-1 decode steps run K at one thread, then M at every thread, in turn"
    )
    parser.add_argument("--http", action="store_true", help="serve over HTTP to a client process (as bench.served)")
    parser.add_argument("--pooled", type=int, default=POOLED, help="passes in a row from which they are pooled")
    parser.add_argument("--out", help="also write the JSON here")
    a = parser.parse_args()
    forced = (int(a.forced.split(",")[0]), int(a.forced.split(",")[1])) if a.forced else None
    result = bench_thread_switch(a.checkpoint, a.corpus, a.requests, a.new_tokens, a.streams, forced, a.http, a.pooled)
    write_json(result, a.out)


if __name__ == "__main__":
    main()
