"""Served /generate speed against the model's own, and against an older commit's server.

    python -m bench.served [--baseline GIT_REF] [--rounds 2] [--streams 16] [--new-tokens 200]

Phases, one torch process at a time (two would fight over the cores):
  1. offline: generate() in this process on the prompts the servers get, greedy, at every
     draft count 0 .. k-1, eager and with the service's compiled step; the fastest is "the
     model's own speed" at batch 1;
  2. servers in alternating phases A, B, A, B ... (this checkout, then GIT_REF's code checked
     out in a temporary worktree), each measuring one sequential stream and `streams`
     concurrent ones (POST /generate, greedy, default speculation; the sequential stream both
     streamed and as JSON replies, the concurrent ones streamed).
Every ratio is computed from figures of this one run; a server's figure is the median of its rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from app import config
from app.decoding.compiled import CompiledDecoder
from app.decoding.generate import generate
from app.engine.compile import cache_dir, compile_shapes
from app.engine.config import EngineConfig
from app.model.checkpoint import load_checkpoint, load_tokenizer, resolve_device, resolve_dtype
from bench.decoding import heldout_prompts, write_json
from bench.server import ROOT, baseline_tree, progress, running
from bench.service import generate_load


def offline_rate(
    checkpoint: str, prompts: list[list[int]], new_tokens: int, device: str, compiled: bool = False
) -> dict[str, Any]:
    """Tokens/s of generate() at batch 1 over the prompts, for each draft count; and the best.

    compiled: with the service's compiled step (CompiledDecoder at the engine's default shapes,
    caches and autotuning, so Inductor's cache is shared with the servers), at the draft counts
    the service's policy can pick; else eager at every draft count."""
    dev = resolve_device(device)
    model, _ = load_checkpoint(checkpoint, device=dev, dtype=resolve_dtype("auto", dev))  # as the servers load it
    counts = list(range(model.cfg.k))
    dec = None
    if compiled:
        cfg = EngineConfig()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir(cfg))
        _, widths, greedy, _ = compile_shapes(cfg, model)
        autotune = cfg.compile_autotune and dev.type == "cpu"
        dec = CompiledDecoder(model, cfg.max_batch_size, autotune, batch_sizes=[1], widths=widths, greedy_widths=greedy)
        counts = [w - 1 for w in (greedy or widths)]
    rates: dict[int, float] = {}
    with torch.inference_mode():
        for n in counts:
            generate(model, prompts[:1], 8, speculative=n > 0, draft_tokens=n, compiled=dec)  # warm (compiles)
            tokens, t0 = 0, time.perf_counter()
            for p in prompts:
                g = generate(model, [p], new_tokens, speculative=n > 0, draft_tokens=n, compiled=dec)
                tokens += len(g.tokens[0])
            rates[n] = tokens / (time.perf_counter() - t0)
    best = max(rates, key=lambda n: rates[n])
    return {
        "tokens_per_s_by_drafts": {n: round(r, 1) for n, r in rates.items()},
        "best_drafts": best,
        "tokens_per_s": round(rates[best], 1),
    }


def served_phase(
    root: Path,
    checkpoint: str,
    device: str,
    texts: list[str],
    streams: int,
    new_tokens: int,
    settings: Mapping[str, object] | None = None,
) -> dict[str, Any]:
    """One server of root's code on the checkpoint, default settings (plus `settings`; the tests
    turn compile off): one sequential stream through the texts, streamed (SSE) and then as JSON
    replies, then `streams` concurrent streamed ones."""
    base = {
        "log_level": "WARNING",
        "device": device,
        "max_queue_size": 1024,
        "max_new_tokens": max(256, new_tokens),
        **(settings or {}),
    }
    with running(checkpoint, base, root=root, ready_timeout=1800) as srv:  # a cold compile: minutes
        one = asyncio.run(generate_load(srv.url, texts, 1, new_tokens, len(texts)))
        json_one = asyncio.run(generate_load(srv.url, texts, 1, new_tokens, len(texts), stream=False))
        many = asyncio.run(generate_load(srv.url, texts, streams, new_tokens, 2))
    return {"1_stream": one, "1_stream_json": json_one, f"{streams}_streams": many}


def bench_served(
    checkpoint: str,
    corpus: str,
    baseline: str | None,
    rounds: int,
    streams: int,
    new_tokens: int,
    prompts: int,
    device: str = "cpu",
    skip_eager: bool = False,
) -> dict[str, Any]:
    """skip_eager: no offline eager run (the compiled one is what the targets compare with)."""
    tok = load_tokenizer(checkpoint)
    ids = heldout_prompts(corpus, tok, prompts, 32, seed=1)
    texts = [tok.decode(p) for p in ids]
    out: dict[str, Any] = {
        "benchmark": "served_generate",
        "checkpoint": checkpoint,
        "new_tokens": new_tokens,
        "prompts": prompts,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if not skip_eager:
        out["offline"] = progress("bench.served", "offline eager", offline_rate(checkpoint, ids, new_tokens, device))
    out["offline_compiled"] = progress(
        "bench.served", "offline compiled", offline_rate(checkpoint, ids, new_tokens, device, compiled=True)
    )
    trees = {"this": ROOT, **({"baseline": baseline_tree(baseline)} if baseline else {})}
    phases: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for _ in range(rounds):
        for name, root in trees.items():  # A, B, A, B: drift on this machine hits both alike
            phases[name].append(
                progress(
                    "bench.served", f"server {name}", served_phase(root, checkpoint, device, texts, streams, new_tokens)
                )
            )
    keys = ("1_stream", "1_stream_json", f"{streams}_streams")
    med = {
        name: {key: statistics.median(p[key]["tokens_per_s"] for p in runs) for key in keys}
        for name, runs in phases.items()
    }
    out["phases"] = phases
    out["tokens_per_s"] = med
    ratios = {
        f"{key}_vs_offline_compiled": round(med["this"][key] / out["offline_compiled"]["tokens_per_s"], 3)
        for key in keys[:2]
    }
    if not skip_eager:
        ratios["1_stream_vs_offline"] = round(med["this"]["1_stream"] / out["offline"]["tokens_per_s"], 3)
    if baseline:
        out["baseline"] = baseline
        for key in keys:
            ratios[f"{key}_vs_baseline"] = round(med["this"][key] / med["baseline"][key], 2)
    out["ratios"] = ratios
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(config.DEFAULT_CHECKPOINT))
    parser.add_argument("--corpus", default=str(config.DEFAULT_CORPUS))
    parser.add_argument("--baseline", help="a git ref whose server to compare against (e.g. a0fa624)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of server phases")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: the offline run and the servers")
    parser.add_argument("--skip-eager-offline", action="store_true", help="time offline generate() compiled only")
    parser.add_argument("--out", help="also write the JSON here")
    a = parser.parse_args()
    result = bench_served(
        a.checkpoint,
        a.corpus,
        a.baseline,
        a.rounds,
        a.streams,
        a.new_tokens,
        a.prompts,
        a.device,
        a.skip_eager_offline,
    )
    write_json(result, a.out)


if __name__ == "__main__":
    main()
