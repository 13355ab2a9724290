"""Served greedy speculative bytes/s of several checkpoints, all on this checkout's server code.

    python -m bench.models CHECKPOINT [CHECKPOINT ...] [--rounds 2] [--prompts 8] [--new-bytes 400]
        [--streams 1] [--compile-cache-dir DIR] [--out FILE]

The checkpoints may have different tokenizers (bytes, BPE), so the comparison is in text bytes:
  - every checkpoint gets the same prompts: spans of `prompt_chars` characters cut from the
    held-out 10% of the corpus, as text;
  - each request asks for about `new_bytes` bytes: max_new_tokens = new_bytes / the
    checkpoint's bytes per token on the held-out text;
  - bytes/s counts the UTF-8 bytes of the generated text the server returned, over wall time.
Phases, one server at a time (two would fight over the cores): each round starts a `mtp serve`
for each checkpoint in turn (A, B, A, B ... : drift on this machine hits every checkpoint
alike), with default settings (compiled steps, as served; /info's `compiled` is recorded, so
a failed compile shows), and measures `streams` concurrent streams of greedy POST /generate
(default speculation), each stream through every prompt. A checkpoint's figure is the median
of its rounds; every ratio (a checkpoint's median bytes/s over the first checkpoint's, the
reference) is computed from figures of this one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import torch

from app import config
from app.model.checkpoint import CheckpointError, load_config, load_tokenizer
from app.training.data import read_corpus, split_text
from bench.decoding import write_json
from bench.server import running
from bench.service import raw_post, read_sse

PROMPT_CHARS = 64  # about 32 tokens of a BPE tokenizer, 64 of the byte-level default model


def heldout_texts(held: str, n: int, chars: int, seed: int = 1) -> list[str]:
    """n spans of `chars` characters from random offsets of the held-out text."""
    if len(held) <= chars:
        raise ValueError(f"the held-out text has {len(held)} characters, too few for {chars}-character prompts")
    rng = random.Random(seed)
    return [held[s : s + chars] for s in (rng.randrange(0, len(held) - chars) for _ in range(n))]


def plan(checkpoint: str, held: str, texts: list[str], new_bytes: int) -> dict[str, Any]:
    """What a checkpoint is asked for: its bytes per token on the held-out text and the
    max_new_tokens that gives about new_bytes; ValueError if a prompt and those tokens
    do not fit its context (the server would refuse the request)."""
    cfg, tok = load_config(checkpoint), load_tokenizer(checkpoint)
    per_token = len(held.encode()) / len(tok.encode(held))
    new_tokens = max(1, round(new_bytes / per_token))
    longest = max(len(tok.encode(t)) for t in texts)
    if longest + new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"{checkpoint}: a prompt of {longest} tokens + {new_tokens} new tokens ({new_bytes} bytes at "
            f"{per_token:.2f} bytes/token) exceed its context of {cfg.max_seq_len} tokens; lower --new-bytes"
        )
    return {
        "checkpoint": checkpoint,
        "vocab_size": cfg.vocab_size,
        "k": cfg.k,
        "head_type": cfg.head_type,
        "max_seq_len": cfg.max_seq_len,
        "bytes_per_token": round(per_token, 3),
        "max_new_tokens": new_tokens,
    }


def final_event(events: list[bytes]) -> dict[str, Any] | None:
    """The last event's JSON if it is a stream's final one (it carries generated_text and details)."""
    if not events or not events[-1].startswith(b"data: "):
        return None
    last = json.loads(events[-1][len(b"data: ") :])
    return last if isinstance(last, dict) and last.get("generated_text") is not None else None


async def text_load(url: str, texts: list[str], streams: int, new_tokens: int) -> dict[str, Any]:
    """`streams` keep-alive connections, each streaming greedy /generate requests back to back,
    one per prompt (stream i starts at prompt i); counted from each stream's final event."""
    n_bytes = tokens = accepted = sequences = errors = 0
    host, port = url.removeprefix("http://").split(":")

    async def stream(i: int) -> None:
        nonlocal n_bytes, tokens, accepted, sequences, errors
        reader, writer = await asyncio.open_connection(host, int(port))
        for r in range(len(texts)):
            events: list[bytes] = []
            body = {"inputs": texts[(i + r) % len(texts)], "parameters": {"max_new_tokens": new_tokens}, "stream": True}
            status, _, error = await read_sse(reader, writer, raw_post("/generate", body), events)
            final = final_event(events)
            if status != 200 or error or final is None:
                errors += 1
                continue
            sequences += 1
            n_bytes += len(final["generated_text"].encode())  # UTF-8 bytes: comparable across tokenizers
            tokens += final["details"]["generated_tokens"]
            accepted += final["details"]["speculation"]["accepted_tokens"]
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(stream(i) for i in range(streams)))
    wall = time.perf_counter() - t0
    # a forward emits 1 + its accepted drafts (the prefill: the first token), so forwards = tokens - accepted
    forwards = tokens - accepted
    return {
        "streams": streams,
        "sequences": sequences,
        "errors": errors,
        "bytes": n_bytes,
        "tokens": tokens,
        "seconds": round(wall, 3),
        "bytes_per_s": round(n_bytes / wall, 1),
        "tokens_per_s": round(tokens / wall, 1),
        "tokens_per_forward": round(tokens / forwards, 3) if forwards else None,
    }


def served_phase(
    checkpoint: str,
    texts: list[str],
    streams: int,
    new_tokens: int,
    compile_cache_dir: str | None = None,
    settings: Mapping[str, object] | None = None,
) -> dict[str, Any]:
    """One server on the checkpoint, default settings (plus `settings`): /info's compiled entry,
    then `streams` concurrent streams through the prompts."""
    base = {
        "log_level": "WARNING",
        "max_queue_size": 1024,
        "max_new_tokens": max(256, new_tokens),
        "compile_cache_dir": compile_cache_dir,  # None: left unset
        **(settings or {}),
    }
    t0 = time.perf_counter()
    with running(checkpoint, base, ready_timeout=1800) as srv:  # a cold compile: minutes
        ready_s = time.perf_counter() - t0
        compiled = httpx.get(f"{srv.url}/info", timeout=30).json().get("compiled")
        asyncio.run(text_load(srv.url, texts[:1], 1, 8))  # warm the connection path
        load = asyncio.run(text_load(srv.url, texts, streams, new_tokens))
    return {**load, "ready_s": round(ready_s, 1), "compiled": compiled}


def summarize(entries: list[dict[str, Any]]) -> None:
    """Each entry's medians over its phases, and its median bytes/s over the first entry's."""
    for e in entries:
        tpf = [p["tokens_per_forward"] for p in e["phases"] if p["tokens_per_forward"] is not None]
        e["median"] = {
            "bytes_per_s": statistics.median(p["bytes_per_s"] for p in e["phases"]),
            "tokens_per_s": statistics.median(p["tokens_per_s"] for p in e["phases"]),
            "tokens_per_forward": statistics.median(tpf) if tpf else None,
        }
    ref = entries[0]["median"]["bytes_per_s"]
    for e in entries:
        e["bytes_per_s_vs_first"] = round(e["median"]["bytes_per_s"] / ref, 3) if ref else None


def bench_models(
    checkpoints: list[str],
    corpus: str,
    rounds: int = 2,
    prompts: int = 8,
    new_bytes: int = 400,
    streams: int = 1,
    compile_cache_dir: str | None = None,
    prompt_chars: int = PROMPT_CHARS,
    settings: Mapping[str, object] | None = None,
) -> dict[str, Any]:
    """The run; ValueError or CheckpointError before any server starts if an argument is bad.
    settings: extra server settings for every phase (the tests turn compile off)."""
    for name, value in (("rounds", rounds), ("prompts", prompts), ("new_bytes", new_bytes), ("streams", streams)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not checkpoints:
        raise ValueError("give at least one checkpoint")
    if not Path(corpus).is_file():
        raise ValueError(f"{corpus}: no such corpus file")
    held = split_text(read_corpus(corpus))[1]
    texts = heldout_texts(held, prompts, prompt_chars)
    entries = [{**plan(c, held, texts, new_bytes), "phases": []} for c in checkpoints]
    for _ in range(rounds):
        for e in entries:  # A, B, A, B: one server at a time
            path = str(Path(e["checkpoint"]).resolve())  # the servers run from the repository root
            e["phases"].append(served_phase(path, texts, streams, e["max_new_tokens"], compile_cache_dir, settings))
    summarize(entries)
    return {
        "benchmark": "served_models",
        "reference": checkpoints[0],
        "corpus": corpus,
        "rounds": rounds,
        "prompts": prompts,
        "prompt_chars": prompt_chars,
        "new_bytes": new_bytes,
        "streams": streams,
        "compile_cache_dir": compile_cache_dir,
        "client_torch_threads": torch.get_num_threads(),
        "checkpoints": entries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="the first is the reference")
    parser.add_argument("--corpus", default=str(config.DEFAULT_CORPUS))
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of server phases")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-bytes", type=int, default=400, help="about this many generated bytes per request")
    parser.add_argument("--streams", type=int, default=1, help="concurrent /generate streams")
    parser.add_argument("--compile-cache-dir", help="the servers' MTP_COMPILE_CACHE_DIR (default: theirs)")
    parser.add_argument("--out", help="also write the JSON here")
    a = parser.parse_args()
    if a.compile_cache_dir:
        a.compile_cache_dir = str(Path(a.compile_cache_dir).resolve())  # the servers run from the repository root
    try:
        result = bench_models(a.checkpoints, a.corpus, a.rounds, a.prompts, a.new_bytes, a.streams, a.compile_cache_dir)
    except (ValueError, CheckpointError) as exc:
        parser.error(str(exc))
    write_json(result, a.out)


if __name__ == "__main__":
    main()
