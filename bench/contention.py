"""Served single-stream speed with a core taken by another process, against the quiet machine.

    python -m bench.contention [--rounds 2] [--prompts 4] [--new-tokens 200] [--configs default ...]

For each server configuration (default settings; MTP_ADAPTIVE_THREADS=false, the fixed thread
count; MTP_TORCH_THREADS=1), one server at a time: one sequential stream of greedy /generate
requests on a quiet machine, then with `python -c "while True: pass"` running beside it, then
quiet again, and so on for `rounds`. The busy loop is a neighbour at normal priority that
wants one whole core. Prints tokens/s per phase and busy/quiet ratios, all from this run, and
per phase the cores the server's threads kept busy, the host's stolen share, and what its
draft and thread policies chose at batch 1 (from /info, read before the neighbour stops).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from app import config
from app.model.checkpoint import load_tokenizer
from bench.decoding import heldout_prompts, write_json
from bench.server import measured, policies, running
from bench.service import generate_load

CONFIGS: dict[str, dict[str, object]] = {
    "default": {},
    "fixed_threads": {"adaptive_threads": "false"},
    "one_thread": {"torch_threads": 1, "adaptive_threads": "false"},
}


@contextlib.contextmanager
def busy_core() -> Iterator[None]:
    """A process that keeps one core busy for the length of the block."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def bench_contention(
    checkpoint: str, corpus: str, rounds: int, prompts: int, new_tokens: int, configs: list[str] | None = None
) -> dict[str, Any]:
    """configs: the names in CONFIGS to run (default: all)."""
    tok = load_tokenizer(checkpoint)
    texts = [tok.decode(p) for p in heldout_prompts(corpus, tok, prompts, 32, seed=1)]
    out: dict[str, Any] = {"benchmark": "served_under_contention", "checkpoint": checkpoint, "configs": {}}
    for name in configs or list(CONFIGS):
        settings = CONFIGS[name]
        phases: dict[str, list[float]] = {"quiet": [], "busy": []}
        details: list[dict[str, Any]] = []
        with running(checkpoint, {"log_level": "WARNING", **settings}, ready_timeout=600) as srv:
            asyncio.run(generate_load(srv.url, texts[:1], 1, 16, 1))  # warm the connection path
            pid = srv.proc.pid
            for _ in range(rounds):
                for phase in ("quiet", "busy"):
                    with busy_core() if phase == "busy" else contextlib.nullcontext():
                        r = measured(lambda: asyncio.run(generate_load(srv.url, texts, 1, new_tokens, len(texts))), pid)
                        # read while the neighbour still runs: what the thread policy chose under it
                        details.append({"phase": phase, **r, "policies": policies(srv.url)})
                    phases[phase].append(r["tokens_per_s"])
        quiet, busy = statistics.median(phases["quiet"]), statistics.median(phases["busy"])
        out["configs"][name] = {
            "settings": settings,
            "tokens_per_s": phases,
            "quiet_median": quiet,
            "busy_median": busy,
            "busy_over_quiet": round(busy / quiet, 2),
            "phases": details,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT))
    parser.add_argument("--corpus", default=str(config.DEFAULT_CORPUS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), help="only these server settings")
    parser.add_argument("--out", help="also write the JSON here")
    a = parser.parse_args()
    write_json(bench_contention(a.checkpoint, a.corpus, a.rounds, a.prompts, a.new_tokens, a.configs), a.out)


if __name__ == "__main__":
    main()
