"""Benchmark 3: the service under load — a real uvicorn process and concurrent HTTP clients.

Figures (printed as JSON, ratios measured in the same run):
  - /predict requests/s at C concurrent clients with batching vs max_batch_size=1;
  - served /predict throughput as a fraction of in-process batched forward throughput
    at the served mean batch size, in adjacent pairs, each with what the served run shared its
    cores with (the server's event loop, this process's clients) and its passes' share of its
    wall time and mean time against the in-process pass;
  - the ceiling of the first ratio on this device: score_next alone at that batch size vs
    one prompt per pass;
  - /generate aggregate tokens/s at S concurrent streams vs 1 stream;
  - p50/p99 latency and time to first token at each level.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from app.decoding.predict import score_next
from app.model.checkpoint import load_checkpoint
from app.model.model import MTPTransformer
from bench.decoding import heldout_prompts
from bench.server import ROOT, Server, histogram_totals, measured, running


def server(
    checkpoint: str, device: str, root: Path = ROOT, **settings: Any
) -> contextlib.AbstractContextManager[Server]:
    """A ready `mtp serve` of root's `app` on `device` with these settings, quiet below WARNING. The
    caller's MTP_* variables reach it (e.g. MTP_MALLOC_MMAP_THRESHOLD=0 for a comparison run)."""
    return running(checkpoint, {"device": device, "log_level": "WARNING", **settings}, inherit_mtp=True, root=root)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def read_response(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on an open keep-alive connection.

    A lean client (pre-encoded request, minimal parsing) rather than httpx: the load generator
    shares the server's cores, and httpx does more work per request than this.
    """
    writer.write(raw)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def raw_post(path: str, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def predict_load(url: str, texts: list[str], clients: int, seconds: float) -> dict[str, Any]:
    """`clients` keep-alive connections, each sending /predict requests back to back."""
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    host, port = url.removeprefix("http://").split(":")
    reqs = [raw_post("/predict", {"inputs": t, "top_n": 5}) for t in texts]

    async def client(i: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        j = i
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            status, _, body = await read_response(reader, writer, reqs[j % len(reqs)])
            if status == 200 and b'"results"' in body:
                lat.append(time.perf_counter() - t0)
            else:
                errors += 1
            j += clients
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": errors,
        "requests_per_s": round(len(lat) / wall, 1),
        "p50_ms": round(pct(lat, 0.5) * 1000, 1),
        "p99_ms": round(pct(lat, 0.99) * 1000, 1),
    }


async def read_sse(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes, events: list[bytes] | None = None
) -> tuple[int, list[float], bool]:
    """One streamed request on an open keep-alive connection, read as chunked SSE with minimal
    parsing (as read_response does for JSON): (status, arrival time of each event, error seen).
    events: each event's bytes (`data: {...}`) are appended here too."""
    writer.write(raw)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"chunked" not in head.lower():  # an error reply: a JSON body with a length
        lines = head.lower().split(b"\r\n")
        await reader.readexactly(next((int(ln[15:]) for ln in lines if ln.startswith(b"content-length:")), 0))
        return status, [], True
    arrivals: list[float] = []
    error = False
    buf = b""
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        data = (await reader.readexactly(size + 2))[:-2]
        if size == 0:
            return status, arrivals, error
        now = time.perf_counter()
        buf += data
        *frames, buf = buf.split(b"\n\n")
        for event in frames:
            error = error or event.startswith(b'data: {"error"')
            arrivals.append(now)
        if events is not None:
            events.extend(frames)


async def generate_load(
    url: str, texts: list[str], streams: int, new_tokens: int, rounds: int, stream: bool = True
) -> dict[str, Any]:
    """`streams` keep-alive connections, each sending `rounds` /generate requests back to back:
    streamed (SSE, one event per token), or with stream=False as one JSON reply each, whose
    details count its tokens (no time to first token then)."""
    ttft: list[float] = []
    lat: list[float] = []
    tokens = 0
    errors = 0
    host, port = url.removeprefix("http://").split(":")

    def request(text: str) -> bytes:
        params = {"max_new_tokens": new_tokens, "details": not stream}
        return raw_post("/generate", {"inputs": text, "parameters": params, "stream": stream})

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: str) -> int | None:
        """The request's tokens, or None if it failed."""
        t0 = time.perf_counter()
        if not stream:
            status, _, body = await read_response(reader, writer, request(text))
            if status != 200:
                return None
            lat.append(time.perf_counter() - t0)
            return int(json.loads(body)["details"]["generated_tokens"])
        status, arrivals, error = await read_sse(reader, writer, request(text))
        if status != 200 or error or not arrivals:
            return None
        ttft.append(arrivals[0] - t0)
        lat.append(arrivals[-1] - t0)
        return len(arrivals)  # one event per token

    async def client(i: int) -> None:
        nonlocal tokens, errors
        reader, writer = await asyncio.open_connection(host, int(port))
        for r in range(rounds):
            n = await one(reader, writer, texts[(r * streams + i) % len(texts)])
            if n is None:
                errors += 1
            else:
                tokens += n
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(streams)))
    wall = time.perf_counter() - t0
    return {
        "streams": streams,
        "streamed": stream,
        "sequences": len(lat),
        "errors": errors,
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(pct(ttft, 0.5) * 1000, 1) if ttft else None,
        "ttft_p99_ms": round(pct(ttft, 0.99) * 1000, 1) if ttft else None,
        "latency_p50_ms": round(pct(lat, 0.5) * 1000, 1),
        "latency_p99_ms": round(pct(lat, 0.99) * 1000, 1),
    }


def batch_totals(url: str, kind: str) -> tuple[float, float]:
    """(sum, count) of the server's mtp_batch_size histogram for `kind`, so far."""
    return histogram_totals(url, "mtp_batch_size").get(kind, (0.0, 0.0))


def mean_batch(url: str, kind: str, since: tuple[float, float] = (0.0, 0.0)) -> float:
    """Mean batch size of `kind` passes since the `since` totals (warmup and earlier phases excluded)."""
    total, count = batch_totals(url, kind)
    total, count = total - since[0], count - since[1]
    return total / count if count else 0.0


def inprocess_predict_rate(model: MTPTransformer, prompts: list[list[int]], batch: int, seconds: float) -> float:
    """Requests/s of score_next alone on batches of `batch` prompts (no HTTP, no JSON, no queue)."""
    batch = max(1, batch)
    rows = [prompts[i % len(prompts)] for i in range(batch)]
    score_next(model, rows, 5)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        score_next(model, rows, 5)
        n += 1
    return n * batch / (time.perf_counter() - t0)


def bench_service(
    checkpoint: str,
    corpus: str,
    device: str = "cpu",
    dtype: str = "float32",
    clients: int = 32,
    seconds: float = 15.0,
    streams: int = 16,
    new_tokens: int = 64,
    rounds: int = 4,
    torch_threads: int | None = None,
    draft_tokens: int | None = None,
) -> dict[str, Any]:
    _, tok = load_checkpoint(checkpoint)
    prompts = heldout_prompts(corpus, tok, 64, 32, seed=1)
    texts = [tok.decode(p) for p in prompts]
    out: dict[str, Any] = {
        "benchmark": "service_under_load",
        "checkpoint": checkpoint,
        "device": device,
        "dtype": dtype,
    }
    extra: dict[str, Any] = {"torch_threads": torch_threads} if torch_threads else {}
    if draft_tokens is not None:
        extra["draft_tokens"] = draft_tokens
        out["draft_tokens"] = draft_tokens
    if torch_threads:
        torch.set_num_threads(torch_threads)  # the in-process baseline runs with the same threads

    with server(checkpoint, device, dtype=dtype, max_batch_size=1, max_queue_size=1024, **extra) as srv:
        url = srv.url
        out["predict_unbatched"] = asyncio.run(predict_load(url, texts, clients, seconds))
    with server(checkpoint, device, dtype=dtype, max_batch_size=clients, max_queue_size=1024, **extra) as srv:
        url = srv.url
        before = batch_totals(url, "predict")
        out["predict_batched"] = asyncio.run(predict_load(url, texts, clients, seconds))
        out["predict_batched"]["mean_batch_size"] = round(mean_batch(url, "predict", before), 2)
        # the lone stream runs 4x the rounds, so that its phase lasts seconds, not a fraction of one
        out["generate_1_stream"] = asyncio.run(generate_load(url, texts, 1, new_tokens, 4 * rounds))
        before = batch_totals(url, "decode")
        out["generate_n_streams"] = asyncio.run(generate_load(url, texts, streams, new_tokens, rounds))
        out["generate_n_streams"]["mean_decode_batch"] = round(mean_batch(url, "decode", before), 2)
        # served vs in-process, in adjacent pairs (this machine's speed drifts within a run): a
        # short served run, then score_next alone at the served batch size with the server idle
        model, _ = load_checkpoint(checkpoint, device=device, dtype=dtype)
        mb = round(out["predict_batched"]["mean_batch_size"])
        pairs = []
        for _ in range(3):
            passes = histogram_totals(url, "mtp_forward_duration_seconds").get("predict", (0.0, 0.0))
            rows = batch_totals(url, "predict")
            cpu, t0 = time.process_time(), time.perf_counter()
            load = measured(lambda: asyncio.run(predict_load(url, texts, clients, 5.0)), srv.proc.pid)
            wall = time.perf_counter() - t0
            client = (time.process_time() - cpu) / wall
            after = histogram_totals(url, "mtp_forward_duration_seconds").get("predict", (0.0, 0.0))
            pass_s, n_passes = after[0] - passes[0], after[1] - passes[1]
            served_i = load["requests_per_s"]
            inproc_i = inprocess_predict_rate(model, prompts, mb, 5.0)
            cores = load.get("server_cores") or {}
            pairs.append(
                {
                    "served": served_i,
                    "inprocess": round(inproc_i, 1),
                    "fraction": round(served_i / inproc_i, 3),
                    # what the served run's event loop (HTTP, JSON, tokenizing) took from the
                    # cores the pass shares with it (bench.side_load: what that costs the pass)
                    "server_cores": cores,
                    # this process's clients run on the same cores, and in-process has none
                    "client_cores": round(client, 3),
                    # the served run's /predict passes: their share of its wall time (the rest
                    # the core waited for requests) and their mean time, against a pass of
                    # score_next alone at the served mean batch
                    "forward_busy": round(pass_s / wall, 3),
                    "mean_batch_size": round(mean_batch(url, "predict", rows), 2),
                    "served_pass_ms": round(pass_s / n_passes * 1000, 2) if n_passes else None,
                    "inprocess_pass_ms": round(mb / inproc_i * 1000, 2) if inproc_i else None,
                    "event_loop_ms_per_request": (
                        round(cores["event_loop"] * 1000 / served_i, 3) if "event_loop" in cores and served_i else None
                    ),
                }
            )
        # the most batching can give on this device: score_next alone at the served batch size
        # vs one prompt per pass (the unbatched server's forward), in three adjacent pairs
        ceiling = [
            (inprocess_predict_rate(model, prompts, 1, 3.0), inprocess_predict_rate(model, prompts, mb, 3.0))
            for _ in range(3)
        ]
    served = out["predict_batched"]["requests_per_s"]
    out["served_vs_inprocess_pairs"] = pairs
    out["inprocess_predict_pairs"] = [
        {"batch_1_per_s": round(one, 1), f"batch_{mb}_per_s": round(many, 1)} for one, many in ceiling
    ]
    out["ratios"] = {
        "predict_batched_vs_unbatched": round(served / max(out["predict_unbatched"]["requests_per_s"], 1e-9), 2),
        "predict_served_fraction_of_inprocess": statistics.median(p["fraction"] for p in pairs),
        "predict_inprocess_batched_vs_unbatched": statistics.median(round(b / a, 2) for a, b in ceiling),
        "generate_n_vs_1_stream_tokens_per_s": round(
            out["generate_n_streams"]["tokens_per_s"] / max(out["generate_1_stream"]["tokens_per_s"], 1e-9), 2
        ),
    }
    out["torch_threads"] = torch.get_num_threads()
    return out
