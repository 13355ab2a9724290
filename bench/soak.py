"""Soak: mixed /predict and streaming /generate load from many clients against a real server.

    python -m bench.soak --minutes 10 --clients 64

About 10% of streams are dropped by their client mid-stream. Prints JSON: requests by
outcome, unexpected errors, whether every accepted request was answered, server RSS over
time (growth after warm-up), and the queue / running-sequence gauges at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx

from app.config import DEFAULT_CHECKPOINT, DEFAULT_CORPUS
from app.model.checkpoint import load_tokenizer
from app.training.data import read_corpus, split_text
from bench.decoding import write_json
from bench.service import server


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def gauges(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        for name in ("mtp_running_sequences", "mtp_queue_depth"):
            if line.startswith(name + " "):
                out[name] = float(line.split()[-1])
    return out


async def soak(url: str, pid: int, texts: list[str], clients: int, seconds: float, warmup_s: float) -> dict[str, Any]:
    counts: dict[str, int] = {}
    unexpected: list[str] = []
    rss: list[tuple[float, int]] = []
    stop = time.monotonic() + seconds
    t_start = time.monotonic()

    def count(key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    async def predict(http: httpx.AsyncClient, rng: random.Random) -> None:
        r = await http.post("/predict", json={"inputs": rng.choice(texts), "top_n": 5})
        if r.status_code == 200 and len(r.json()["results"]) == 1:
            count("predict_ok")
        elif r.status_code == 429:
            count("predict_429")
        else:
            unexpected.append(f"predict {r.status_code} {r.text[:200]}")

    async def stream(http: httpx.AsyncClient, rng: random.Random) -> None:
        drop_after = rng.randint(1, 8) if rng.random() < 0.10 else None
        body = {"inputs": rng.choice(texts), "parameters": {"max_new_tokens": rng.randint(8, 64)}, "stream": True}
        if rng.random() < 0.3:
            body["parameters"].update({"do_sample": True, "temperature": 0.8, "top_p": 0.95})  # type: ignore[attr-defined]
        events = 0
        async with http.stream("POST", "/generate", json=body) as r:
            if r.status_code == 429:
                count("generate_429")
                return
            if r.status_code != 200:
                unexpected.append(f"generate {r.status_code}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    unexpected.append(f"stream error {event}")
                    return
                events += 1
                if drop_after is not None and events >= drop_after:
                    count("generate_dropped")
                    return  # leaving the context manager closes the connection mid-stream
                if event.get("generated_text") is not None:
                    count("generate_ok")
                    return
        unexpected.append("stream ended without a final event")

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(i)
        while time.monotonic() < stop:
            try:
                await (predict(http, rng) if rng.random() < 0.6 else stream(http, rng))
            except httpx.HTTPError as exc:
                unexpected.append(f"transport {type(exc).__name__}")

    async def sampler() -> None:
        while time.monotonic() < stop:
            rss.append((time.monotonic() - t_start, rss_kb(pid)))
            await asyncio.sleep(5)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        await asyncio.gather(sampler(), *(client(i, http) for i in range(clients)))
    await asyncio.sleep(2)  # dropped streams leave the batch at the next step
    after = [kb for t, kb in rss if t >= warmup_s]
    base = after[0] if after else rss[0][1]
    return {
        "clients": clients,
        "seconds": seconds,
        "outcomes": counts,
        "unexpected_errors": len(unexpected),
        "unexpected_samples": unexpected[:10],
        "every_accepted_answered": not unexpected,
        "rss_mb_after_warmup": round(base / 1024, 1),
        "rss_mb_end": round(rss[-1][1] / 1024, 1),
        "rss_growth_after_warmup": round((rss[-1][1] - base) / base, 4),
        "rss_mb_series": [(round(t), round(kb / 1024, 1)) for t, kb in rss],
        "gauges_at_end": gauges(url),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--warmup-s", type=float, default=60.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tok = load_tokenizer(args.checkpoint)
    held = split_text(read_corpus(args.corpus))[1]
    rng = random.Random(0)
    starts = [rng.randrange(0, len(held) - 200) for _ in range(200)]
    texts = [held[s : s + rng.randint(20, 150)] for s in starts]
    texts = [t for t in texts if 0 < len(tok.encode(t)) <= 150]
    with server(args.checkpoint, "cpu", max_batch_size=32, max_queue_size=512, request_timeout_s=120) as srv:
        url = srv.url
        result = asyncio.run(soak(url, srv.proc.pid, texts, args.clients, args.minutes * 60, args.warmup_s))
    write_json(result, args.out)


if __name__ == "__main__":
    main()
