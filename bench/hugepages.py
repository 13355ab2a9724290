"""The service's compiled batch-1 steps in processes on small pages against processes on huge pages.

    python -m bench.hugepages [--mode collapse|tunable] [--rounds 3] [--prompts 8] [--new-tokens 200]
                              [--eager] [--out FILE]

A compiled CPU decode step reads every weight of its graph (Inductor freezes a copy of the
weights into each graph), a few MB per step at batch 1 over thousands of 4 KiB pages, more
than the TLB holds; on 2 MiB pages they take a few entries. Where transparent huge pages are
given only on request (`madvise`, the usual default), malloc'd memory never gets them. Two
ways to ask, `--mode`:
  collapse  after warm-up, the process's anonymous memory rebuilt as huge pages
            (MADV_COLLAPSE, Linux 6.1), once;
  tunable   glibc's malloc asks for huge pages from the process's start
            (GLIBC_TUNABLES=glibc.malloc.hugetlb=1).

Huge pages are a property of a process, so each side is a process of its own: pairs of child
processes, one after the other (small pages, then huge pages), never two at once. Each child
loads the checkpoint, builds the service's compiled steps at batch 1 (`bench.served`'s
offline side: the engine's default shapes, autotuning and C++ wrapper, Inductor's cache shared
with the service), warms every draft count, (collapses,) then times greedy generate() over the
held-out prompts at every draft count the service's policy can pick, twice, and keeps its best.
Prints each child's tokens/s and huge-page MiB, and the per-pair ratios huge / small.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
from typing import Any

from app import config
from app.model.checkpoint import load_tokenizer
from bench.decoding import heldout_prompts, write_json
from bench.served import Offline
from bench.server import ROOT, progress

MADV_COLLAPSE = 25  # <linux/mman.h>
HUGE = 1 << 21  # 2 MiB


def anon_huge_mib() -> int | None:
    """AnonHugePages of this process in MiB (None where /proc does not say)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return next((int(line.split()[1]) >> 10 for line in f if line.startswith("AnonHugePages:")), None)
    except OSError:
        return None


def collapse() -> dict[int, int]:
    """MADV_COLLAPSE over the 2 MiB-aligned part of each private writable anonymous mapping
    (heap, malloc arenas, large allocations); returns errno -> mappings the kernel declined."""
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    errors: dict[int, int] = {}
    with open("/proc/self/maps") as f:
        maps = [line.split() for line in f]
    for fields in maps:
        path = fields[5] if len(fields) > 5 else ""
        if fields[1] != "rw-p" or (path and path != "[heap]"):
            continue
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        start, end = -(-lo // HUGE) * HUGE, hi // HUGE * HUGE
        if end > start and madvise(start, end - start, MADV_COLLAPSE) != 0:
            errors[ctypes.get_errno()] = errors.get(ctypes.get_errno(), 0) + 1
    return errors


def child(args: argparse.Namespace, collapse_after_warmup: bool) -> dict[str, Any]:
    """One side's process: build, warm, (collapse,) time twice."""
    off = Offline(args.checkpoint, "cpu", compiled=not args.eager)
    prompts = heldout_prompts(args.corpus, load_tokenizer(args.checkpoint), args.prompts, 32, seed=1)
    off.rate(prompts[:1], 8)  # compiles or loads every draft count's graphs
    declined = collapse() if collapse_after_warmup else None
    runs = [off.rate(prompts, args.new_tokens) for _ in range(2)]
    with open("/proc/self/status") as f:
        rss = next((int(line.split()[1]) >> 10 for line in f if line.startswith("VmRSS:")), None)
    return {
        "runs": runs,
        "tokens_per_s": max(r["tokens_per_s"] for r in runs),
        "anon_huge_mib": anon_huge_mib(),
        "collapse_declined": declined,
        "rss_mib": rss,
    }


def run_side(args: argparse.Namespace, side: str) -> dict[str, Any]:
    env = dict(os.environ)
    huge = side == "huge"
    if huge and args.mode == "tunable":
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1"]))
    kind = "collapse" if huge and args.mode == "collapse" else "plain"
    cmd = [sys.executable, "-m", "bench.hugepages", "--child", kind, "--checkpoint", args.checkpoint]
    cmd += ["--corpus", args.corpus, "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens)]
    cmd += ["--eager"] if args.eager else []
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT))
    ap.add_argument("--corpus", default=str(config.DEFAULT_CORPUS))
    ap.add_argument("--mode", choices=["collapse", "tunable"], default="collapse", help="how the huge side asks")
    ap.add_argument("--rounds", type=int, default=3, help="pairs of processes (small pages, then huge pages)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--eager", action="store_true", help="eager steps (as MTP_COMPILE=false serves)")
    ap.add_argument("--child", choices=["plain", "collapse"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args, args.child == "collapse")))
        return
    pairs = []
    for r in range(args.rounds):
        pair: dict[str, Any] = {side: run_side(args, side) for side in ("small", "huge")}
        pair["ratio"] = round(pair["huge"]["tokens_per_s"] / pair["small"]["tokens_per_s"], 3)
        pairs.append(pair)
        rates = {s: pair[s]["tokens_per_s"] for s in ("small", "huge")}
        progress("bench.hugepages", f"pair {r + 1}", rates | {"ratio": pair["ratio"]})
    ratios = [p["ratio"] for p in pairs]
    result = {
        "benchmark": "huge_pages",
        "mode": args.mode,
        "steps": "eager" if args.eager else "compiled",
        "checkpoint": args.checkpoint,
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "pairs": pairs,
        "tokens_per_s_median": {s: statistics.median(p[s]["tokens_per_s"] for p in pairs) for s in ("small", "huge")},
        "huge_over_small_per_pair": ratios,
        "huge_over_small_median": statistics.median(ratios),
    }
    write_json(result, args.out)


if __name__ == "__main__":
    main()
