"""The event loop's CPU time per request: this checkout's server against another commit's, in
alternating phases.

    python -m bench.loop_cost [--baseline GIT_REF] [--rounds 2] [--seconds 8] [--clients 32] [--out FILE]

The served /predict stays under the issue's 0.85 of in-process because uvicorn's event loop takes
its share of the two cores from the pass's team of threads (docs/benchmarks.md, benchmark 34):
the lever left is the loop's work per request. This measures it, for each server in turn (one
up at a time: A, B, A, B ...), as the main thread's CPU time over a load divided by the load's
requests, read from /proc's per-thread times (user + system):
  predict: `clients` keep-alive clients sending /predict (top_n 5) for `seconds`;
  generate_json: `streams` concurrent clients sending /generate with `details` (as TGI's
      clients ask), 64 new tokens each, ROUNDS requests per client;
  generate_sse: the same, streamed.
The per-thread times count in 10 ms ticks, so each load runs long enough for the loop to take
about half a second of CPU or more.
The servers run eager steps (MTP_COMPILE=false): the loop's work per request does not depend on
how the step is computed, and a compiled start takes minutes here. The ratio is this
checkout's figure over the baseline's, each the median of its rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app import config
from app.model.checkpoint import load_tokenizer
from bench.decoding import heldout_prompts, write_json
from bench.served import server_trees
from bench.server import host_times, progress, running, steal_share, thread_times
from bench.service import generate_load, predict_load

NEW_TOKENS = 64
ROUNDS = 6  # requests per /generate client: 96 at 16 clients, enough CPU time for /proc's 10 ms ticks


def main_thread_ms(pid: int, before: dict[int, int] | None, after: dict[int, int] | None) -> float | None:
    """The CPU time (ms) of the server's main thread, where uvicorn's event loop runs, between two thread_times()."""
    if before is None or after is None or pid not in after:
        return None
    return (after[pid] - before.get(pid, 0)) * 1e3 / os.sysconf("SC_CLK_TCK")


def loop_cost(pid: int, load: Callable[[], dict[str, Any]], count_key: str) -> dict[str, Any]:
    """load()'s figures, with the loop's CPU per counted request and the host's steal share."""
    host, before, t0 = host_times(), thread_times(pid), time.perf_counter()
    result = load()
    wall = time.perf_counter() - t0
    loop_ms = main_thread_ms(pid, before, thread_times(pid))
    count = result[count_key]
    return {
        **result,
        "wall_s": round(wall, 2),
        "loop_cores": round(loop_ms / 1e3 / wall, 3) if loop_ms is not None else None,
        "loop_ms_per_request": round(loop_ms / count, 3) if loop_ms is not None and count else None,
        "steal_share": steal_share(host, host_times()),
    }


def phase(root: Path, checkpoint: str, texts: list[str], clients: int, streams: int, seconds: float) -> dict[str, Any]:
    settings = {"log_level": "WARNING", "compile": False, "max_queue_size": 1024, "max_new_tokens": 256}
    out: dict[str, Any] = {}
    with running(checkpoint, settings, root=root) as srv:
        pid = srv.proc.pid
        asyncio.run(predict_load(srv.url, texts, clients, 2.0))  # warm: the first requests of each kind
        asyncio.run(generate_load(srv.url, texts, 1, NEW_TOKENS, 2, stream=False))
        out["predict"] = loop_cost(pid, lambda: asyncio.run(predict_load(srv.url, texts, clients, seconds)), "requests")

        for key, stream in (("generate_json", False), ("generate_sse", True)):
            load = lambda s=stream: asyncio.run(generate_load(srv.url, texts, streams, NEW_TOKENS, ROUNDS, stream=s))
            out[key] = loop_cost(pid, load, "sequences")
    return out


def bench_loop_cost(
    checkpoint: str, corpus: str, baseline: str | None, rounds: int, clients: int, streams: int, seconds: float
) -> dict[str, Any]:
    tok = load_tokenizer(checkpoint)
    texts = [tok.decode(p) for p in heldout_prompts(corpus, tok, 32, 32, seed=1)]
    trees = server_trees(baseline, None)
    phases: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for r in range(rounds):
        for name, root in trees.items():
            result = phase(root, checkpoint, texts, clients, streams, seconds)
            phases[name].append(progress("bench.loop_cost", f"{name} round {r + 1}", result))
    loads = ("predict", "generate_json", "generate_sse")
    medians = {
        name: {load: statistics.median(p[load]["loop_ms_per_request"] for p in runs) for load in loads}
        for name, runs in phases.items()
    }
    out: dict[str, Any] = {
        "benchmark": "loop_cost",
        "checkpoint": checkpoint,
        "baseline": baseline,
        "clients": clients,
        "streams": streams,
        "seconds": seconds,
        "new_tokens": NEW_TOKENS,
        "phases": phases,
        "loop_ms_per_request": medians,
    }
    if "baseline" in medians:
        out["this_over_baseline"] = {
            load: round(medians["this"][load] / medians["baseline"][load], 3) for load in loads
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT))
    parser.add_argument("--corpus", default=str(config.DEFAULT_CORPUS))
    parser.add_argument("--baseline", help="a git ref whose server to compare against")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of server phases")
    parser.add_argument("--clients", type=int, default=32, help="concurrent /predict clients")
    parser.add_argument("--streams", type=int, default=16, help="concurrent /generate clients (JSON, then streamed)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the /predict load")
    parser.add_argument("--out", help="also write the JSON here")
    a = parser.parse_args()
    write_json(bench_loop_cost(a.checkpoint, a.corpus, a.baseline, a.rounds, a.clients, a.streams, a.seconds), a.out)


if __name__ == "__main__":
    main()
