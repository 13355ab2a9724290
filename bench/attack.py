"""Attack suite: known failure modes, each reproduced against a real `mtp serve` process.

    python -m bench.attack [--only NAME[,NAME]] [--out FILE] [--checkpoint DIR] [--no-compile]

Every attack runs over loopback with loops bounded in count and time, and judges the server
only by what it measures: statuses, timings, counters in /metrics, the server's own log.
Prints a Markdown table (attack | what was measured | result | verdict); exits non-zero if
any attack shows its defect or could not run. The servers run the code of the checkout this
suite lives in (bench/server.py), so the same suite in a `git worktree` of an older commit
records a "before". With `--no-compile` (eager steps) about 1.5 minutes on the project's
2-core CPU when it is otherwise idle, before the eight attacks of 2026-12-03 were added (38 s
on their own); with the default compiled steps each server's start compiles them at one torch
thread first (7 minutes for the first server on 2026-12-02, with a cache warmed only by servers
at the default thread count).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import os
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from app.config import DEFAULT_CHECKPOINT
from bench.server import HOST, ROOT, NotReady, Server

KEY = "secret"
TOKENS = "mtp_generated_tokens_total"
RUNNING = "mtp_running_sequences"
QUEUED = "mtp_queue_depth"
# One server (started once) serves every attack that needs no special setting of its own.
# Long requests: new tokens that, after a short prompt, still fit the default model's context (256
# tokens): a request asking for more is refused with 422 and never runs.
LONG = 200
COMMON: dict[str, object] = {"max_queue_size": 16, "max_new_tokens": LONG, "drain_timeout_s": 3}
AUTH: dict[str, object] = {"api_key": KEY, "max_queue_size": 16}
# Bodies cut short by a 1 s timeout or a 4 KiB limit; max_new_tokens left at its default (256, the
# default model's context), the setting under which chat's default length once failed.
SHORT_BODY: dict[str, object] = {"max_queue_size": 16, "body_timeout_s": 1, "max_body_bytes": 4096}


@dataclass
class Result:
    name: str
    measured: str
    result: str
    defect: bool | None  # None: the attack could not set up its condition (not reproduced)
    details: dict[str, Any] = field(default_factory=dict)
    crashed: bool = False
    seconds: float = 0.0

    @property
    def verdict(self) -> str:
        if self.crashed:
            return "ERROR"
        return {True: "DEFECT", False: "ok", None: "not reproduced"}[self.defect]


# ---- servers --------------------------------------------------------------------------------


def launch(checkpoint: str, workdir: Path, settings: Mapping[str, object | None]) -> Server:
    """A server on the CPU with these MTP_* settings (None: left unset), its output in a log file
    in `workdir`; not yet ready."""
    return Server.start(checkpoint, {"device": "cpu", "log_level": "INFO", **settings}, log_dir=workdir)


class Lab:
    """Starts servers: one shared server at a time (reused while the settings match) and
    dedicated ones for attacks that stop or time their server. `defaults` go to every server
    unless an attack overrides them."""

    def __init__(self, checkpoint: str, workdir: Path, defaults: Mapping[str, object | None] | None = None) -> None:
        self.checkpoint = checkpoint
        self.workdir = workdir
        self.defaults = dict(defaults or {})
        self._shared: tuple[tuple[tuple[str, str], ...], Server] | None = None

    def shared(self, settings: Mapping[str, object | None]) -> Server:
        full = {**self.defaults, **settings}
        key = tuple(sorted((k, str(v)) for k, v in full.items()))
        if self._shared is not None and self._shared[0] == key and self._shared[1].proc.poll() is None:
            return self._shared[1]
        self.close()
        srv = launch(self.checkpoint, self.workdir, full)
        self._shared = (key, srv)
        srv.wait_ready()
        return srv

    @contextlib.contextmanager
    def dedicated(self, ready_timeout: float = 900.0, **settings: object | None) -> Iterator[Server]:
        srv = launch(self.checkpoint, self.workdir, {**self.defaults, **settings})
        try:
            srv.wait_ready(ready_timeout)
            yield srv
        finally:
            srv.stop()

    def close(self) -> None:
        if self._shared is not None:
            self._shared[1].stop()
            self._shared = None

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- HTTP helpers -----------------------------------------------------------------------------


def address(url: str) -> tuple[str, int]:
    u = urlparse(url)
    return u.hostname or HOST, u.port or 80


def request_bytes(method: str, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None) -> bytes:
    hdrs = {"Host": HOST}
    if body:
        hdrs.update({"Content-Type": "application/json", "Content-Length": str(len(body))})
    hdrs.update(headers or {})
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    return head.encode() + body


def status_of(data: bytes) -> int:
    """The status of a raw HTTP response's first bytes; 0 if there is none."""
    parts = data.split(b" ", 2)
    return int(parts[1]) if data.startswith(b"HTTP/") and len(parts) > 1 and parts[1].isdigit() else 0


def read_reply(s: socket.socket, buf: bytearray, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One reply from a raw keep-alive socket: (status, lower-cased headers, its Content-Length body;
    none with `head_only`, as for HEAD). What arrived past it stays in `buf`, to be read as the next
    reply; status 0 when what came first is not a reply's head (a previous reply's stray body)."""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            raise ConnectionError(f"closed before a whole head ({bytes(buf[:60])!r})")
        buf += data
    end = buf.index(b"\r\n\r\n")
    head = bytes(buf[:end])
    del buf[: end + 4]
    lines = (ln.decode("latin-1").partition(":") for ln in head.split(b"\r\n")[1:])
    headers = {k.strip().lower(): v.strip() for k, _, v in lines}
    length = headers.get("content-length", "0")
    length_n = 0 if head_only or not length.isdigit() else int(length)
    while len(buf) < length_n:
        data = s.recv(65536)
        if not data:
            break
        buf += data
    body = bytes(buf[:length_n])
    del buf[:length_n]
    return status_of(head), headers, body


def closed_within(s: socket.socket, seconds: float) -> bool:
    """True if the server closes (or resets) this socket within `seconds`, sending nothing more."""
    s.settimeout(seconds)
    try:
        return s.recv(1024) == b""
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def wait_idle(url: str, timeout: float = 30.0) -> bool:
    """Wait until nothing runs or waits in the engine; False if it is still busy at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(url, RUNNING) == 0 and metric(url, QUEUED) == 0:
            return True
        time.sleep(0.2)
    return False


def error_message(r: httpx.Response) -> str:
    """The message of either error envelope ({"error": str} or OpenAI's {"error": {"message"}})."""
    try:
        err = r.json().get("error")
    except (ValueError, AttributeError):
        return r.text[:200]
    return str(err.get("message") if isinstance(err, dict) else err)


def timed(fn: Callable[[], httpx.Response]) -> tuple[int, float]:
    t0 = time.perf_counter()
    try:
        status = fn().status_code
    except httpx.HTTPError:
        status = 0
    return status, time.perf_counter() - t0


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def counts(values: list[Any]) -> str:
    return ", ".join(f"{k}×{n}" for k, n in sorted(Counter(values).items(), key=lambda kv: str(kv[0])))


@dataclass
class Stream:
    """What a client saw of one streamed request."""

    status: int = 0
    events: list[Any] = field(default_factory=list)  # decoded `data:` payloads ("[DONE]" kept as a string)
    complete: bool = False  # the body ended properly (last chunk, or a whole fixed-length body)
    timed_out: bool = False  # still going at the client's deadline
    ended_at: float = 0.0  # time.monotonic()

    @property
    def kind(self) -> str:
        if self.status != 200:
            return f"http {self.status}" if self.status else ("running" if self.timed_out else "no answer")
        if any(isinstance(e, dict) and "error" in e for e in self.events):
            return "error event"
        if any(_is_final(e) for e in self.events):
            return "final"
        return "running" if self.timed_out else "cut"

    def error_type(self) -> str | None:
        for e in self.events:
            if isinstance(e, dict) and "error" in e:
                err = e["error"]
                return str(err.get("type") if isinstance(err, dict) else e.get("error_type"))
        return None


def _is_final(event: Any) -> bool:
    if not isinstance(event, dict):
        return False
    if event.get("generated_text") is not None:  # /generate's last event
        return True
    choices = event.get("choices") or [{}]
    return choices[0].get("finish_reason") is not None  # /v1/completions' last chunk


async def stream_sse(url: str, path: str, payload: Mapping[str, Any], deadline: float) -> Stream:
    """POST one streamed request on its own connection and read it (chunked SSE) to its end."""
    out = Stream()
    host, port = address(url)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request_bytes("POST", path, json.dumps(payload).encode()))
            head = await reader.readuntil(b"\r\n\r\n")
            out.status = status_of(head)
            if b"transfer-encoding: chunked" not in head.lower():
                m = re.search(rb"content-length: *(\d+)", head.lower())
                await reader.readexactly(int(m.group(1)) if m else 0)
                out.complete = True
                return out
            buf = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip() or b"0", 16)
                data = (await reader.readexactly(size + 2))[:-2]
                if size == 0:
                    out.complete = True
                    return out
                buf += data
                *frames, buf = buf.split(b"\n\n")
                for frame in frames:
                    if frame.startswith(b"data: "):
                        body = frame[6:]
                        out.events.append(body.decode() if body == b"[DONE]" else json.loads(body))
    except TimeoutError:
        out.timed_out = True
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError, ValueError):
        pass  # the connection ended early: kind() says "cut"
    finally:
        out.ended_at = time.monotonic()
        if writer is not None:
            writer.close()
    return out


# ---- attacks: authentication and the queue -----------------------------------------------------


def _stall(url: str, stop: float, out: list[tuple[int, float]]) -> None:
    """Keyless POST /generate whose body stops after its first byte; reconnect when answered or closed.
    Records (status, seconds to the answer): 0 = closed without one, -1 = still held at the end."""
    head = request_bytes("POST", "/generate", headers={"Content-Type": "application/json", "Content-Length": "100"})
    while (left := stop - time.monotonic()) > 0:
        t0 = time.monotonic()
        try:
            with socket.create_connection(address(url), timeout=left) as s:
                s.sendall(head + b"{")
                s.settimeout(max(stop - time.monotonic(), 0.01))
                status = status_of(s.recv(64))
        except TimeoutError:
            status = -1
        except OSError:
            status = 0
        out.append((status, time.monotonic() - t0))
        time.sleep(0.25)  # a refused staller comes back, but not in a tight loop


def keyless_queue_lock(url: str, key: str = KEY, stallers: int = 20, seconds: float = 8.0) -> Result:
    """Keyless clients that stall mid-body must not take the queue places of authenticated ones."""
    payload = {"inputs": "ROMEO:", "parameters": {"max_new_tokens": 8}}
    keyless: list[tuple[int, float]] = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        baseline = [timed(lambda: http.post("/generate", json=payload)) for _ in range(5)]
        stop = time.monotonic() + seconds
        threads = [threading.Thread(target=_stall, args=(url, stop, keyless), daemon=True) for _ in range(stallers)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the stallers take their places first
        during: list[tuple[int, float]] = []
        while time.monotonic() < stop:
            during.append(timed(lambda: http.post("/generate", json=payload)))
            time.sleep(0.05)  # a refused client must not spin
        for t in threads:
            t.join(timeout=5)
    base_p50 = statistics.median(s for _, s in baseline)
    p50 = statistics.median(s for _, s in during) if during else float("inf")
    failed = sum(st != 200 for st, _ in during)
    answered = [s for st, s in keyless if st > 0]
    return Result(
        "keyless-queue-lock",
        f"authenticated /generate for {seconds:.0f} s beside {stallers} keyless connections stalled mid-body "
        "(MTP_MAX_QUEUE_SIZE=16)",
        f"authenticated: {counts([st for st, _ in during])}, p50 {ms(p50)} (baseline {ms(base_p50)}); "
        f"keyless: {counts([{-1: 'held to the end', 0: 'closed'}.get(st, st) for st, _ in keyless])}"
        + (f", median answer {ms(statistics.median(answered))}" if answered else ""),
        failed > 0 or p50 > 5 * base_p50 + 0.25,
        {"auth_statuses": dict(Counter(st for st, _ in during)), "auth_p50_s": p50, "baseline_p50_s": base_p50},
    )


def keyless_malformed(url: str) -> Result:
    """Under MTP_API_KEY a keyless request is refused (401) before its body is parsed."""
    r = httpx.post(f"{url}/generate", content=b'{"inputs": ', headers={"content-type": "application/json"}, timeout=10)
    return Result(
        "keyless-malformed",
        "keyless POST /generate with malformed JSON under MTP_API_KEY",
        f"{r.status_code} {error_message(r)!r}",
        r.status_code != 401,
    )


def keyless_post_routes(url: str) -> Result:
    """Under MTP_API_KEY every POST route in the schema answers 401 without the key: POST /
    (TGI's compat route for /generate) once ran generation without it."""
    paths = httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    posts = sorted(p for p, ops in paths.items() if "post" in ops)
    body = {"inputs": "ROMEO:", "parameters": {"max_new_tokens": 2}}  # a valid /generate (and /) body
    got = {p: httpx.post(url + p, json=body, timeout=30).status_code for p in posts}
    unrefused = {p: s for p, s in got.items() if s != 401}
    return Result(
        "keyless-post-routes",
        f"keyless POST of a valid /generate body to each of the {len(posts)} POST routes in /openapi.json "
        "under MTP_API_KEY",
        f"401 on {len(posts) - len(unrefused)} of {len(posts)}"
        + (f"; answered without the key: {', '.join(f'{p} {s}' for p, s in unrefused.items())}" if unrefused else ""),
        bool(unrefused) if "/" in posts else None,  # POST / is the route that had the hole
        {"statuses": got},
    )


def oversized_fanout(url: str) -> Result:
    """A request of more sequences (n, prompts × best_of) or inputs than the queue holds can never be
    admitted: on an idle server it is invalid (400 on /v1, 422), not overloaded (a 429 is retried forever)."""
    wait_idle(url)
    limits = httpx.get(f"{url}/info", timeout=10).json()["limits"]
    q = limits["max_queue_size"]
    user = [{"role": "user", "content": "ROMEO:"}]
    cases: list[tuple[str, str, dict[str, Any]]] = [
        (f"n={q + 1}", "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 2, "n": q + 1}),
        (
            f"{q // 2 + 1} prompts × best_of 2",
            "/v1/completions",
            {"prompt": [f"ROMEO {i}:" for i in range(q // 2 + 1)], "max_tokens": 2, "best_of": 2},
        ),
        (f"chat n={q + 1}", "/v1/chat/completions", {"messages": user, "max_tokens": 2, "n": q + 1}),
        (f"/predict {q + 1} inputs", "/predict", {"inputs": [f"ROMEO {i}:" for i in range(q + 1)]}),
    ]
    got = {label: httpx.post(url + path, json=body, timeout=60) for label, path, body in cases}
    fits = min(q, limits["max_inputs_per_request"])  # the control: as many as the queue holds is served
    control = httpx.post(f"{url}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 2, "n": fits}, timeout=60)
    wait_idle(url)
    wrong = {k: r.status_code for k, r in got.items() if r.status_code not in (400, 422)}
    return Result(
        "oversized-fanout",
        f"on an idle server (MTP_MAX_QUEUE_SIZE={q}): requests of {q + 1} or more sequences or inputs; "
        f"control: n={fits}",
        "; ".join(
            f"{k}: {r.status_code}" + (f" Retry-After {r.headers['retry-after']}" if "retry-after" in r.headers else "")
            for k, r in got.items()
        )
        + f"; control {control.status_code}",
        bool(wrong) or control.status_code != 200,
        {"statuses": {k: r.status_code for k, r in got.items()}, "control": control.status_code},
    )


def refused_multi_prompt(url: str, queue_size: int = 16, max_tokens: int = LONG, watch_s: float = 3.0) -> Result:
    """A multi-prompt completion refused for lack of queue room must not leave its admitted prompts running.

    The request has as many prompts as the queue holds (more is refused as invalid, before any is
    admitted); half the places are first taken by requests whose bodies stall at the door, so the
    first half of its prompts is admitted and the next one refused."""
    wait_idle(url)
    held = queue_size // 2
    headers = {"Content-Type": "application/json", "Content-Length": "100"}
    head = request_bytes("POST", "/v1/completions", headers=headers)
    stalled = [socket.create_connection(address(url), timeout=10) for _ in range(held)]
    try:
        for s in stalled:
            s.sendall(head + b"{")  # the door takes a place for each, and the body never comes
        time.sleep(0.5)
        body = {"prompt": [f"ROMEO {i}:" for i in range(queue_size)], "max_tokens": max_tokens, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    finally:
        for s in stalled:
            s.close()
    at_answer = metric(url, TOKENS)
    time.sleep(watch_s)
    growth = metric(url, TOKENS) - at_answer
    wait_idle(url)
    return Result(
        "refused-multi-prompt",
        f"/v1/completions with {queue_size} prompts × {max_tokens} tokens (queue {queue_size}, {held} places "
        f"held by stalled bodies); {TOKENS} for {watch_s:.0f} s after the answer",
        f"{r.status_code} {error_message(r)[:60]!r}; +{growth:.0f} tokens generated after the answer",
        None if r.status_code != 429 else growth > 50,  # only a 429 leaves siblings that may run on
        {"status": r.status_code, "tokens_after_answer": growth},
    )


# ---- attacks: inputs ---------------------------------------------------------------------------


@contextlib.contextmanager
def polled_health(url: str) -> Iterator[list[float]]:
    """GET /health every 100 ms on a thread while the block runs (after 0.3 s of it first);
    yields the list its latencies (s) are appended to."""
    health: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as c:
            while not done.is_set():
                health.append(timed(lambda: c.get(f"{url}/health"))[1])
                done.wait(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    time.sleep(0.3)
    try:
        yield health
    finally:
        done.set()
        poller.join(timeout=35)


def tokenize_bomb(url: str, chars: int = 1_000_000) -> Result:
    """A ~1 MB text is refused at once by /tokenize and /generate, and /health stays fast meanwhile."""
    text = "a " * (chars // 2)
    with polled_health(url) as health:
        t0 = time.perf_counter()
        with httpx.stream("POST", f"{url}/tokenize", json={"inputs": text}, timeout=120) as r:
            tok_status, tok_bytes = r.status_code, sum(len(b) for b in r.iter_bytes())
        tok_s = time.perf_counter() - t0
        gen = [timed(lambda: httpx.post(f"{url}/generate", json={"inputs": text}, timeout=60)) for _ in range(2)]
        gen_status, gen_s = min(gen, key=lambda g: g[1])
    worst = max(health, default=float("inf"))
    return Result(
        "tokenize-bomb",
        f"POST /tokenize and /generate with a {chars / 1e6:.0f} MB text; /health polled every 100 ms",
        f"/tokenize {tok_status} ({tok_bytes / 1e6:.1f} MB body, {tok_s:.2f} s); /generate {gen_status} in "
        f"{ms(gen_s)}; /health max {ms(worst)} over {len(health)} polls",
        tok_status == 200 or worst > 1.0 or gen_status != 422 or gen_s >= 0.2,
        {"tokenize_status": tok_status, "generate_status": gen_status, "generate_s": gen_s, "health_max_s": worst},
    )


def huge_header(url: str, megabytes: int = 64) -> Result:
    """A request head of many megabytes (one header, sent as fast as loopback takes it) is cut
    off at the limit, and /health stays fast meanwhile; the parser's appends once made it
    seconds of event-loop time."""
    host, port = urlparse(url).hostname or HOST, urlparse(url).port or 80
    with polled_health(url) as health:
        t0 = time.perf_counter()
        with socket.create_connection((host, port), timeout=60) as s:
            reply = b""
            try:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
                chunk = b"a" * (1 << 20)
                for _ in range(megabytes):
                    s.sendall(chunk)
                s.sendall(b"\r\n\r\n")
            except OSError:
                pass  # closed before the whole head went out: what it answered is read below
            with contextlib.suppress(OSError):
                reply = s.recv(200)
        took = time.perf_counter() - t0
        time.sleep(0.3)
    status = int(reply.split(b" ")[1]) if reply.startswith(b"HTTP/1.1 ") else 0
    worst = max(health, default=float("inf"))
    return Result(
        "huge-header",
        f"a request with a {megabytes} MB header over one connection; /health polled every 100 ms",
        f"{status or 'no reply'} after {took:.2f} s; /health max {ms(worst)} over {len(health)} polls",
        status != 431 or worst > 1.0,
        {"status": status, "reply_s": took, "health_max_s": worst},
    )


async def _with_bad_neighbour(url: str, bad: Mapping[str, Any], good: int) -> tuple[int, list[int]]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        params = {"max_new_tokens": 20}
        calls = [http.post("/generate", json={"inputs": "JULIET:", "parameters": {**params, **bad}})]
        calls += [http.post("/generate", json={"inputs": f"ROMEO {i}:", "parameters": params}) for i in range(good)]
        responses = await asyncio.gather(*calls)
    return responses[0].status_code, [r.status_code for r in responses[1:]]


def top_k_overflow(url: str, good: int = 10) -> Result:
    """Out-of-range sampling numbers are refused (422) and never fail the requests that share their batch."""
    cases: dict[str, dict[str, Any]] = {
        "top_k=2^63": {"top_k": 2**63, "do_sample": True},
        "temperature=1e308": {"temperature": 1e308, "do_sample": True},
    }
    parts, defect, details = [], False, {}
    for label, bad in cases.items():
        bad_status, goods = asyncio.run(_with_bad_neighbour(url, bad, good))
        failed = sum(s != 200 for s in goods)
        defect = defect or bad_status != 422 or failed > 0
        parts.append(f"{label}: bad {bad_status}, good {counts(goods)}")
        details[label] = {"bad": bad_status, "good": goods}
    return Result(
        "top-k-overflow",
        f"{good} greedy /generate requests concurrent with one out-of-range sampling request",
        "; ".join(parts),
        defect,
        details,
    )


def lone_surrogate(url: str) -> Result:
    """A lone UTF-16 surrogate (the JSON escape \\ud800) in any text field is a 422 that names the field
    (on /v1, OpenAI's 400 invalid_request_error)."""
    s = "\\ud800"  # in the JSON text, not a Python surrogate: json.loads turns it into one server-side
    cases = [
        ("/predict", "inputs", f'{{"inputs": "{s}"}}'),
        ("/tokenize", "inputs", f'{{"inputs": "{s}"}}'),
        ("/generate", "inputs", f'{{"inputs": "{s}", "parameters": {{"max_new_tokens": 4}}}}'),
        ("/v1/completions", "prompt", f'{{"prompt": "{s}", "max_tokens": 4}}'),
        ("/v1/completions", "model", f'{{"prompt": "ROMEO:", "model": "{s}", "max_tokens": 4}}'),
    ]
    parts, defect = [], False
    for path, fld, body in cases:
        r = httpx.post(url + path, content=body.encode(), headers={"content-type": "application/json"}, timeout=30)
        named = fld in error_message(r)
        defect = defect or r.status_code != (400 if path.startswith("/v1/") else 422) or not named
        parts.append(f"{path} {fld}: {r.status_code}" + ("" if named or r.status_code == 200 else " (field not named)"))
    return Result("lone-surrogate", 'JSON "\\ud800" in each text field', "; ".join(parts), defect)


def token_id_body(url: str, ids: int = 499_000, clients: int = 2, bodies: int = 4) -> Result:
    """Bodies of ~1 MB of token ids (past the context: 422) are refused quickly and /health stays fast
    meanwhile: the lone-surrogate check once named a path per id, holding the event loop ~1 s per body."""
    body = json.dumps({"input_ids": [1] * ids}, separators=(",", ":")).encode()  # 2 bytes an id: under 1 MiB
    replies: list[tuple[int, float]] = []

    def client() -> None:
        with httpx.Client(timeout=60, headers={"content-type": "application/json"}) as c:
            for _ in range(bodies):
                replies.append(timed(lambda: c.post(f"{url}/predict", content=body)))

    with polled_health(url) as health:
        first = len(health)  # the polls before this are of an idle server
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        took = time.perf_counter() - t0
    during = health[first:] or [float("inf")]
    p50, worst = statistics.median(during), max(during)
    slowest = max((s for _, s in replies), default=float("inf"))
    return Result(
        "token-id-body",
        f"{clients} clients each sending {bodies} /predict bodies of {ids:,} token ids ({len(body) / 1e6:.2f} MB) "
        "one after another; /health polled every 100 ms",
        f"{counts([st for st, _ in replies])} in {took:.2f} s (slowest reply {ms(slowest)}); /health median "
        f"{ms(p50)}, max {ms(worst)} over {len(health) - first} polls",
        # 2026-12-03, 2-core host: median 632 and 880 ms on 56c4fbf (before the fix), 70 and 47 ms after
        any(st != 422 for st, _ in replies) or p50 > 0.3,
        {
            "statuses": dict(Counter(st for st, _ in replies)),
            "seconds": took,
            "health_p50_s": p50,
            "health_max_s": worst,
        },
    )


def sse_post(url: str, path: str, body: Mapping[str, Any]) -> tuple[int, list[dict[str, Any]], str]:
    """POST a streamed OpenAI request: (status, its `data:` chunks but [DONE], the error text if not 200)."""
    events: list[dict[str, Any]] = []
    with httpx.stream("POST", url + path, json=body, timeout=120) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, events, error_message(r)
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    return r.status_code, events, ""


def chat_default_max_tokens(url: str) -> Result:
    """/v1/chat/completions without max_tokens is served when max_new_tokens is at least the context
    (the default model: 256 and 256); it asked for one token more than the context left, and got 400."""
    ctx = httpx.get(f"{url}/info", timeout=10).json()["max_seq_len"]
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Good morrow, cousin."}], "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    plain = f"{r.status_code}" + (f" ({r.json()['usage']})" if r.status_code == 200 else f" {error_message(r)!r}")
    streamed, events, err = sse_post(
        url, "/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
    )
    usage = next((e["usage"] for e in reversed(events) if e.get("usage")), None)
    return Result(
        "chat-default-max-tokens",
        f"/v1/chat/completions without max_tokens, plain and streamed (MTP_MAX_NEW_TOKENS unset; context {ctx})",
        f"plain {plain}; streamed {streamed}" + (f" ({usage})" if usage else f" {err!r}" if err else ""),
        r.status_code != 200 or streamed != 200,
        {"plain": r.status_code, "streamed": streamed, "streamed_usage": usage},
    )


def _logprobs_pair(url: str, body: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The logprobs of one greedy completion unstreamed, and its streamed chunks' logprobs joined
    (tokens, text_offset) with the streamed text."""
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    r.raise_for_status()
    whole = r.json()["choices"][0]
    status, events, err = sse_post(url, "/v1/completions", {**body, "stream": True})
    if status != 200:
        raise RuntimeError(f"streamed: {status} {err}")
    joined: dict[str, Any] = {"tokens": [], "text_offset": [], "text": ""}
    for e in events:
        for c in e.get("choices", []):
            joined["text"] += c["text"]
            if c.get("logprobs"):
                joined["tokens"] += c["logprobs"]["tokens"]
                joined["text_offset"] += c["logprobs"]["text_offset"]
    unstreamed = {"tokens": whole["logprobs"]["tokens"], "text_offset": whole["logprobs"]["text_offset"]}
    return {**unstreamed, "text": whole["text"]}, joined


def streamed_logprobs(url: str, max_tokens: int = 24) -> Result:
    """Streamed /v1/completions logprobs give each token's own text and offset, as the unstreamed reply
    does (they gave the text released with the token, empty while a stop sequence might begin, and 0)."""
    body: dict[str, Any] = {"prompt": "ROMEO:", "max_tokens": max_tokens, "temperature": 0, "logprobs": 2}
    plain = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    # a stop that matches the text's start and never ends: it holds text back from there on
    held = plain[1:4] + next(c for c in "~|#@^" if c not in plain)
    parts, diffs = [], {}
    for label, case in (("no stop", body), (f"stop {held!r}", {**body, "stop": [held]})):
        whole, streamed = _logprobs_pair(url, case)
        differ = [k for k in ("tokens", "text_offset", "text") if whole[k] != streamed[k]]
        parts.append(f"{label}: {len(whole['tokens'])} tokens, " + (f"{'/'.join(differ)} differ" if differ else "same"))
        if differ:
            diffs[label] = {k: {"unstreamed": whole[k][:8], "streamed": streamed[k][:8]} for k in differ}
    example = next(iter(diffs.values()), {}).get("text_offset")
    return Result(
        "streamed-logprobs",
        f"/v1/completions greedy, {max_tokens} tokens, logprobs=2: streamed chunks' tokens, text_offset and "
        "text against the unstreamed reply",
        "; ".join(parts)
        + (f"; e.g. text_offset {example['streamed']} streamed, {example['unstreamed']} unstreamed" if example else ""),
        bool(diffs),
        {"differences": diffs},
    )


def logit_bias_keys(url: str) -> Result:
    """logit_bias keys are token ids in decimal ASCII digits, and stream_options needs stream: int()
    took ' 5', '1_0', '05' (one token with '5') and Arabic-Indic digits, and stream_options was ignored."""
    base = {"prompt": "ROMEO:", "max_tokens": 2}
    chat = {"messages": [{"role": "user", "content": "ROMEO:"}], "max_tokens": 2}
    cases: list[tuple[str, str, dict[str, Any]]] = [
        (f"logit_bias {k!r}", "/v1/completions", {**base, "logit_bias": {k: 1.0}})
        for k in (" 5", "1_0", "05", "+5", "\u0665")  # U+0665: Arabic-Indic five
    ]
    cases += [
        ("stream_options without stream", "/v1/completions", {**base, "stream_options": {"include_usage": True}}),
        (
            "chat stream_options without stream",
            "/v1/chat/completions",
            {**chat, "stream_options": {"include_usage": True}},
        ),
    ]
    got = {label: httpx.post(url + path, json=body, timeout=60).status_code for label, path, body in cases}
    control = httpx.post(f"{url}/v1/completions", json={**base, "logit_bias": {"5": 1.0}}, timeout=60).status_code
    return Result(
        "logit-bias-keys",
        "/v1/completions with logit_bias keys that int() takes but are not decimal token ids; stream_options "
        "without stream (also chat); control: logit_bias {'5': 1.0}",
        "; ".join(f"{k}: {s}" for k, s in got.items()) + f"; control {control}",
        any(s != 400 for s in got.values()) or control != 200,
        {"statuses": got, "control": control},
    )


def _completion(url: str, prompt: str, max_tokens: int, stop: str | None, stream: bool) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": stop, "stream": stream}
    if not stream:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        r.raise_for_status()
        return str(r.json()["choices"][0]["text"])
    status, events, err = sse_post(url, "/v1/completions", body)
    if status != 200:
        raise RuntimeError(f"streamed /v1/completions: {status} {err}")
    return "".join(c["text"] for e in events for c in e.get("choices", []))


def stop_stream_leak(url: str, max_tokens: int = 60) -> Result:
    """With a stop sequence, the streamed text equals the unstreamed text (no part of the stop leaks)."""
    pairs: list[tuple[str, str]] = []
    for prompt in ("ROMEO:", "JULIET:", "KING RICHARD:"):
        text = _completion(url, prompt, max_tokens, None, stream=False)
        for offset, length in ((4, 3), (14, 4), (24, 5), (34, 6)):  # several tokens each (bytes on this model)
            stop = text[offset : offset + length]
            if len(stop) == length and stop.strip():
                pairs.append((prompt, stop))
    diffs = []
    for prompt, stop in pairs:
        plain = _completion(url, prompt, max_tokens, stop, stream=False)
        streamed = _completion(url, prompt, max_tokens, stop, stream=True)
        if plain != streamed:
            diffs.append({"prompt": prompt, "stop": stop, "unstreamed": plain[-12:], "streamed": streamed[-12:]})
    example = ""
    if diffs:
        d = diffs[0]
        example = f"; e.g. stop {d['stop']!r}: streamed ends {d['streamed']!r}, unstreamed {d['unstreamed']!r}"
    return Result(
        "stop-stream-leak",
        f"/v1/completions greedy, {max_tokens} tokens, streamed vs unstreamed, with stop sequences from the output",
        f"{len(diffs)} of {len(pairs)} (prompt, stop) pairs differ{example}",
        bool(diffs) if pairs else None,
        {"differences": diffs},
    )


# ---- attacks: connections and cancellation ----------------------------------------------------


def disconnect_nonstream(url: str, n: int = 16, new_tokens: int = LONG, close_after_s: float = 0.3) -> Result:
    """A non-streaming /generate whose client goes away stops generating.

    Judged two ways, so that neither a fast nor a slow machine hides the defect: the server
    went on to generate (nearly) all that was asked, or it is still generating 1 s after the
    clients left."""
    wait_idle(url)
    t_before = metric(url, TOKENS)
    c_before = metric(url, "mtp_request_failures_total", reason="cancelled")
    socks = []
    for i in range(n):
        body = {"inputs": f"ROMEO {i}:", "parameters": {"max_new_tokens": new_tokens, "speculative": False}}
        s = socket.create_connection(address(url), timeout=5)
        s.sendall(request_bytes("POST", "/generate", json.dumps(body).encode()))
        socks.append(s)
    time.sleep(close_after_s)
    answered = sum(selectors_ready(s) for s in socks)
    for s in socks:
        s.close()
    at_close = metric(url, TOKENS)
    time.sleep(1.0)
    at_1s, running_1s = metric(url, TOKENS), metric(url, RUNNING)
    time.sleep(2.0)
    at_3s = metric(url, TOKENS)
    cancelled = metric(url, "mtp_request_failures_total", reason="cancelled") - c_before
    remaining = n * new_tokens - (at_close - t_before)
    after, late = at_3s - at_close, at_3s - at_1s
    wait_idle(url)
    return Result(
        "disconnect-nonstream",
        f"{n} non-streaming /generate × {new_tokens} tokens, clients gone after {ms(close_after_s)}; "
        f"{TOKENS} afterwards",
        f"{remaining:.0f} tokens left at the disconnect, {after:.0f} generated after it ({late:.0f} from +1 s to "
        f"+3 s, {running_1s:.0f} sequences running at +1 s); cancelled +{cancelled:.0f}",
        None if answered == n or remaining <= 0 else after >= 0.9 * remaining or (late > 0 and running_1s > 0),
        {"answered_before_close": answered, "remaining": remaining, "after": after, "late": late},
    )


def selectors_ready(s: socket.socket) -> bool:
    """True if the server has sent something (or closed) on this socket by now."""
    with selectors.DefaultSelector() as sel:
        sel.register(s, selectors.EVENT_READ)
        return bool(sel.select(timeout=0))


def watch_closures(
    socks: list[socket.socket], seconds: float, drip: Mapping[int, bytes] | None = None
) -> dict[int, float]:
    """Seconds until the server closed each socket (EOF or reset), for those it closed within `seconds`.
    The sockets in `drip` send their next byte once a second meanwhile."""
    t0 = time.monotonic()
    closed: dict[int, float] = {}
    sent, next_drip = 0, t0
    with selectors.DefaultSelector() as sel:
        for i, s in enumerate(socks):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, i)

        def close(i: int) -> None:
            closed[i] = time.monotonic() - t0
            sel.unregister(socks[i])

        while time.monotonic() - t0 < seconds and len(closed) < len(socks):
            if drip and time.monotonic() >= next_drip:
                for i, data in drip.items():
                    if i not in closed and sent < len(data):
                        try:
                            socks[i].send(data[sent : sent + 1])
                        except OSError:
                            close(i)
                sent, next_drip = sent + 1, next_drip + 1.0
            for key, _ in sel.select(timeout=0.05):
                try:
                    data = socks[key.data].recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    close(key.data)
    return closed


def probe_health(url: str, timeout: float = 2.0) -> str:
    """GET /health on a new raw connection: the status, or what happened instead."""
    try:
        with socket.create_connection(address(url), timeout=timeout) as s:
            s.sendall(request_bytes("GET", "/health"))
            data = s.recv(64)
            return str(status_of(data)) if data else "closed"
    except TimeoutError:
        return "no answer"
    except OSError as exc:
        return f"refused ({type(exc).__name__})"


def head_refusal_framing(url: str, key: str = KEY) -> Result:
    """A HEAD request refused (from its head: no key; or by the app: 404, 405) gets a head and no
    body, so that the next reply on the connection is read as itself: the 401 JSON once followed
    the head, and the client took it as the start of its next reply."""
    probes = [
        ("HEAD /v1/models, no key", "/v1/models", {}),
        ("HEAD /generate, no key", "/generate", {}),
        ("HEAD /no-such-route", "/no-such-route", {}),
        ("HEAD /generate, with the key", "/generate", {"Authorization": f"Bearer {key}"}),
    ]
    parts, defect, bodies = [], False, {}
    with socket.create_connection(address(url), timeout=10) as s:
        buf = bytearray()
        for label, path, headers in probes:  # all on one keep-alive connection, each followed by GET /health
            s.sendall(request_bytes("HEAD", path, headers=headers))
            status, _, _ = read_reply(s, buf, head_only=True)
            s.settimeout(0.3)  # what comes after the head, before the next request is sent, is a body
            with contextlib.suppress(TimeoutError):
                buf += s.recv(65536)
            s.settimeout(10)
            body = bytes(buf)
            s.sendall(request_bytes("GET", "/health"))
            try:
                after, _, reply = read_reply(s, buf)
            except (OSError, ConnectionError):
                after, reply = 0, b""
            healthy = after == 200 and b'"status":"ok"' in reply.replace(b" ", b"")
            defect = defect or status < 400 or bool(body) or not healthy
            parts.append(
                f"{label}: {status}"
                + (f" + {len(body)} body bytes ({body[:24]!r}…)" if body else "")
                + ", then /health "
                + ("200" if healthy else f"unreadable (status {after})")
            )
            bodies[label] = body[:200].decode("latin-1")
    return Result(
        "head-refusal-framing",
        "refused HEAD requests on one keep-alive connection (MTP_API_KEY set), each followed by GET /health",
        "; ".join(parts),
        defect,
        {"bodies_after_head": bodies},
    )


def _after_cut(s: socket.socket, head: bytes, first: bytes) -> tuple[int, str, str]:
    """Send a request whose body stops short; (status, its Connection header, what became of the
    connection: closed by the server, or what a GET /health sent on it then got)."""
    s.sendall(head + first)
    try:
        status, headers, _ = read_reply(s, bytearray())
    except (OSError, ConnectionError):
        return 0, "-", "closed without a reply"
    if closed_within(s, 2.0):
        return status, headers.get("connection", "-"), "closed"
    s.sendall(request_bytes("GET", "/health"))  # kept open: is the next request read as a request?
    s.settimeout(3.0)
    try:
        data = s.recv(200)
    except TimeoutError:
        return status, headers.get("connection", "-"), "kept open; a GET /health on it got no reply in 3 s"
    except OSError as exc:
        return status, headers.get("connection", "-"), f"kept open; a GET /health on it: {type(exc).__name__}"
    got = status_of(data) or (repr(data[:30]) if data else "closed")
    return status, headers.get("connection", "-"), f"kept open 2 s; a GET /health on it got {got}"


def cut_short_body(url: str) -> Result:
    """A reply to a body cut short (408: not all of it arrived in time; 413: a chunked body outgrew the
    limit part-way) closes the connection; kept open, the parser took the client's next request as
    the rest of the body. A body that arrives whole keeps its connection."""
    limit = httpx.get(f"{url}/info", timeout=10).json()["limits"]["max_body_bytes"]
    host_port = address(url)
    results: dict[str, tuple[int, str, str]] = {}
    with socket.create_connection(host_port, timeout=30) as s:  # 19 of the 40 bytes declared
        cut = request_bytes("POST", "/tokenize", headers={"Content-Type": "application/json", "Content-Length": "40"})
        results["408"] = _after_cut(s, cut, b'{"inputs": "ROMEO:"}'[:19])
    with socket.create_connection(host_port, timeout=30) as s:  # past the limit, and the body goes on
        chunked = request_bytes("POST", "/predict", headers={"Transfer-Encoding": "chunked"})
        results["413"] = _after_cut(s, chunked, b"%x\r\n%s\r\n" % (limit + 1000, b" " * (limit + 1000)))
    whole = []
    with socket.create_connection(host_port, timeout=30) as s:
        buf, body = bytearray(), b'{"inputs": "ROMEO:"}'
        for _ in range(2):
            s.sendall(request_bytes("POST", "/tokenize", body))
            st, headers, _ = read_reply(s, buf)
            whole.append(f"{st}" + (" close" if headers.get("connection") == "close" else ""))
    defect = any(str(st) != want or conn != "close" or fate != "closed" for want, (st, conn, fate) in results.items())
    return Result(
        "cut-short-body",
        "POST with 19 of 40 declared body bytes (body timeout); chunked POST past MTP_MAX_BODY_BYTES "
        f"({limit}); then two whole POSTs on one connection",
        "; ".join(f"{st} (Connection: {conn}), {fate}" for st, conn, fate in results.values())
        + f"; whole bodies: {', '.join(whole)}",
        defect or whole != ["200", "200"],
        {"cut": {k: list(v) for k, v in results.items()}, "whole": whole},
    )


def idle_connections(
    url: str, idle_timeout_s: float = 3.0, cap: int = 64, silent: int = 20, drippers: int = 3
) -> Result:
    """Idle and header-dripping connections are closed after MTP_IDLE_TIMEOUT_S, and connections past
    MTP_MAX_CONNECTIONS are refused at once while /health keeps working."""
    slack, observe = 3.0, idle_timeout_s + 5.0
    socks = [socket.create_connection(address(url), timeout=5) for _ in range(silent + drippers)]
    drip = {silent + i: b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 20 for i in range(drippers)}
    closed = watch_closures(socks, observe, drip)
    for s in socks:
        s.close()
    late = [t for t in closed.values() if t > idle_timeout_s + slack]
    still_open = len(socks) - len(closed)
    drip_open = sum(i not in closed for i in drip)

    extra = cap + 36
    held: list[socket.socket] = []
    refused_connect = 0
    for _ in range(extra):
        try:
            held.append(socket.create_connection(address(url), timeout=2))
        except OSError:
            refused_connect += 1
    refused = refused_connect + len(watch_closures(held, 1.0))
    probe = probe_health(url)
    for s in held:
        s.close()
    time.sleep(0.5)
    after = probe_health(url, timeout=5)
    defect_idle = still_open > 0 or bool(late)
    defect_cap = refused < extra - cap or after != "200"
    return Result(
        "idle-connections",
        f"{silent} silent + {drippers} header-dripping sockets for {observe:.0f} s (MTP_IDLE_TIMEOUT_S="
        f"{idle_timeout_s:g}); {extra} idle sockets at MTP_MAX_CONNECTIONS={cap}",
        f"closed by the server: {len(closed)} of {len(socks)}"
        + (f" (last at {max(closed.values()):.1f} s)" if closed else "")
        + f", still open {still_open} ({drip_open} dripping); of {extra}: {refused} refused within 1 s, "
        f"/health while held: {probe}, after: {after}",
        defect_idle or defect_cap,
        {"closed_s": sorted(closed.values()), "still_open": still_open, "refused": refused, "probe": probe},
    )


# ---- attacks: time bounds --------------------------------------------------------------------


@dataclass
class Shutdown:
    exit_code: int | None  # None: still running 25 s after the signal (then killed)
    exit_s: float  # from the last signal to the exit
    streams: list[Stream]
    signalled_at: float  # time.monotonic() of the first signal

    def summary(self, drain_s: float) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "exit_s": round(self.exit_s, 2),
            "streams": dict(Counter(s.kind for s in self.streams)),
            "ended_after_drain": sum(s.ended_at > self.signalled_at + drain_s for s in self.streams),
        }


async def _streams_then_signal(srv: Server, n: int, second_after: float | None) -> Shutdown:
    """n long streams, then SIGTERM (and a second one `second_after` s later); waits for the exit."""
    deadline = time.monotonic() + 45
    body = {"parameters": {"max_new_tokens": LONG, "speculative": False}}
    tasks = [
        asyncio.create_task(stream_sse(srv.url, "/generate_stream", {"inputs": f"ROMEO {i}:", **body}, deadline))
        for i in range(n)
    ]
    await asyncio.sleep(0.8)  # the streams are running
    srv.proc.send_signal(signal.SIGTERM)
    t_sig = t_last = time.monotonic()
    if second_after is not None:
        await asyncio.sleep(second_after)
        if srv.proc.poll() is None:
            srv.proc.send_signal(signal.SIGTERM)
        t_last = time.monotonic()
    while srv.proc.poll() is None and time.monotonic() < t_sig + 25:
        await asyncio.sleep(0.05)
    exited = time.monotonic()
    code = srv.proc.poll()
    if code is None:
        srv.proc.kill()
    return Shutdown(code, exited - t_last, list(await asyncio.gather(*tasks)), t_sig)


def shutdown_bounds(lab: Lab, drain_s: float = 3.0, streams: int = 64) -> Result:
    """SIGTERM: exit 0 within the drain + 2 s, streams cut by the drain end with an error event;
    a second SIGTERM: exit 130 within 1 s."""
    with lab.dedicated(drain_timeout_s=drain_s, max_new_tokens=LONG) as srv:
        one = asyncio.run(_streams_then_signal(srv, streams, None)).summary(drain_s)
    with lab.dedicated(drain_timeout_s=drain_s, max_new_tokens=LONG) as srv:
        two = asyncio.run(_streams_then_signal(srv, streams, 0.5)).summary(drain_s)
    defect_one = one["exit_code"] != 0 or one["exit_s"] > drain_s + 2 or one["streams"].get("cut", 0) > 0
    defect_two = two["exit_code"] != 130 or two["exit_s"] > 1.0
    reproduced = one["ended_after_drain"] > 0 or defect_one  # else every stream ended within the drain
    return Result(
        "shutdown-bounds",
        f"{streams} streams × {LONG} tokens, SIGTERM (MTP_DRAIN_TIMEOUT_S={drain_s:g}); "
        "then SIGTERM twice, 0.5 s apart",
        f"one signal: exit {one['exit_code']} after {one['exit_s']:.1f} s, streams {counts_of(one['streams'])} "
        f"({one['ended_after_drain']} ended after the drain); two signals: exit {two['exit_code']} "
        f"{two['exit_s']:.1f} s after the second",
        True if defect_one or defect_two else (False if reproduced else None),
        {"one_signal": one, "two_signals": two},
    )


def counts_of(kinds: Mapping[str, int]) -> str:
    return ", ".join(f"{k}×{n}" for k, n in sorted(kinds.items()))


EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Cancelled\w*|Group))\b", re.M)


def timeout_traceback(srv: Server, streams: int = 40) -> Result:
    """A request that runs past MTP_REQUEST_TIMEOUT_S is answered with a timeout and logs no traceback."""

    async def load() -> list[Stream]:
        deadline = time.monotonic() + 30
        gen = {"parameters": {"max_new_tokens": LONG, "speculative": False}}
        calls = [
            stream_sse(srv.url, "/generate_stream", {"inputs": f"ROMEO {i}:", **gen}, deadline) for i in range(streams)
        ]
        calls += [
            stream_sse(
                srv.url, "/v1/completions", {"prompt": f"JULIET {i}:", "max_tokens": LONG, "stream": True}, deadline
            )
            for i in range(8)
        ]
        return list(await asyncio.gather(*calls))

    results = asyncio.run(load())
    wait_idle(srv.url)
    time.sleep(0.3)
    log = srv.log()
    timeouts = sum(s.error_type() == "timeout" or s.status == 504 for s in results)
    tracebacks = log.count("Traceback")
    asgi = log.count("Exception in ASGI application")
    errors = sorted(set(EXCEPTION_LINE.findall(log)))
    return Result(
        "timeout-traceback",
        f"{streams} /generate_stream + 8 /v1/completions streams × {LONG} tokens under MTP_REQUEST_TIMEOUT_S=1; "
        "the server log",
        f"streams {counts([s.kind for s in results])}, {timeouts} timed out; log: {tracebacks} tracebacks, "
        f"{asgi} 'Exception in ASGI application'" + (f" ({', '.join(errors)[:120]})" if errors else ""),
        None if timeouts == 0 else tracebacks > 0 or asgi > 0,
        {"timeouts": timeouts, "tracebacks": tracebacks, "asgi_exceptions": asgi, "exceptions": errors},
    )


COST_LINE = re.compile(r"verify-step cost \(ms\) by batch size and drafts: (\{[^;]*\})")  # the first table


def _generate_timed(http: httpx.Client, prompt: str, new_tokens: int) -> tuple[float, float, float, float]:
    """(seconds, tokens, drafted tokens, verify steps) of one greedy /generate request."""
    t0 = time.perf_counter()
    r = http.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": new_tokens, "details": True}})
    seconds = time.perf_counter() - t0
    details = r.json()["details"]
    spec = details["speculation"]
    return seconds, details["generated_tokens"], spec["drafted_tokens"], spec["verify_steps"]


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(obj, dict):
        return {prefix: obj}
    return {
        k: v for key, val in obj.items() for k, v in _flatten(val, f"{prefix}.{key}" if prefix else str(key)).items()
    }


def _draft_settings(srv: Server) -> dict[str, Any]:
    """What the server shows of its draft policy: the start-up cost line in its log, /info and /metrics fields."""
    m = COST_LINE.search(srv.log())
    costs = ast.literal_eval(m.group(1)) if m else None
    found = {k: v for k, v in _flatten(httpx.get(f"{srv.url}/info", timeout=10).json()).items() if "draft" in k.lower()}
    lines = httpx.get(f"{srv.url}/metrics", timeout=10).text.splitlines()
    found.update({ln.split()[0]: ln.split()[-1] for ln in lines if "draft" in ln and not ln.startswith("#")})
    return {"batch1_cost_ms": costs.get(1) if costs else None, "exposed": found}


def draft_policy_contention(lab: Lab, new_tokens: int = 200, budget_s: float = 10.0, busy_loops: int = 2) -> Result:
    """A server started while other processes held the cores decodes, once they are gone, about as fast
    as one that verifies every draft (its start-up timing of the verify step must not fix a bad draft count).

    The reference runs with MTP_ADAPTIVE_DRAFTS=false: it times nothing at start-up, so a busy machine
    cannot skew it, and at batch 1 every draft is the fastest choice for the bundled model (the step
    costs about the same whatever it carries). Two busy loops on the 2-core machine: with one, the
    start-up timings on an otherwise idle machine came out only ~20 % high and the draft count held."""
    prompts = ["ROMEO:", "JULIET:", "KING RICHARD:"]
    try:
        totals, seen = _contended_vs_reference(lab, prompts, new_tokens, budget_s, busy_loops)
    except NotReady as exc:  # on a machine busy beyond the busy loops, start-up can take minutes
        return Result(
            "draft-policy-contention",
            f"a server started beside {busy_loops} busy loops",
            f"{exc} (load average {os.getloadavg()[0]:.1f})",
            None,
        )
    tps = {k: v[1] / v[0] for k, v in totals.items()}
    drafts = {k: v[2] / v[3] if v[3] else 0.0 for k, v in totals.items()}
    ratio = tps["contended"] / tps["reference"]
    return Result(
        "draft-policy-contention",
        f"greedy {new_tokens}-token /generate at batch 1, alternating: a server started beside {busy_loops} busy "
        "loops (killed once ready) vs one with MTP_ADAPTIVE_DRAFTS=false",
        f"{tps['contended']:.0f} vs {tps['reference']:.0f} tokens/s (ratio {ratio:.2f}); drafts per verify step "
        f"{drafts['contended']:.2f} vs {drafts['reference']:.2f}; its batch-1 step cost (ms) by drafts: "
        f"{seen['batch1_cost_ms']}",
        ratio < 0.7,
        {"tokens_per_s": tps, "ratio": ratio, "drafts_per_step": drafts, "draft_policy": seen},
    )


def _contended_vs_reference(
    lab: Lab, prompts: list[str], new_tokens: int, budget_s: float, busy_loops: int
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Per server: (seconds, tokens, drafted tokens, verify steps) summed over alternating requests;
    and what the contended server shows of its draft policy."""
    # torch's default threads (the setting under test); batch 1 only, which keeps the start-up timing short
    settings: dict[str, object | None] = {"torch_threads": None, "max_batch_size": 1}
    totals = {"contended": [0.0] * 4, "reference": [0.0] * 4}
    with lab.dedicated(30, adaptive_drafts="false", **settings) as reference:
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy_loops)]
        try:
            time.sleep(0.5)
            with lab.dedicated(40, **settings) as contended:
                for p in busy:
                    p.kill()
                    p.wait()
                clients = {
                    k: httpx.Client(base_url=s.url, timeout=30)
                    for k, s in (("contended", contended), ("reference", reference))
                }
                for http in clients.values():
                    _generate_timed(http, prompts[0], 20)  # warm
                end = time.monotonic() + budget_s
                for i in range(30):  # alternating requests: drift on the shared machine hits both alike
                    if i and time.monotonic() > end:
                        break
                    for name, http in clients.items():
                        one = _generate_timed(http, prompts[i % len(prompts)], new_tokens)
                        totals[name] = [a + b for a, b in zip(totals[name], one, strict=True)]
                for http in clients.values():
                    http.close()
                seen = _draft_settings(contended)
        finally:
            for p in busy:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return totals, seen


# ---- attacks: small ones ------------------------------------------------------------------------


def broken_config(checkpoint: str, workdir: Path) -> Result:
    """A checkpoint with an unreadable config.json stops `mtp serve` with a message, not a traceback."""
    bad = workdir / "broken-checkpoint"
    bad.mkdir(exist_ok=True)
    for f in Path(checkpoint).iterdir():
        if f.name != "config.json" and not (bad / f.name).exists():
            (bad / f.name).symlink_to(f.resolve())
    (bad / "config.json").write_text('{"d_model": 256, "n_layers": ')  # cut short
    srv = launch(str(bad), workdir, {})
    try:
        code: int | None = srv.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        code = None
        srv.stop()
    out = srv.log()
    last = next((ln for ln in reversed(out.splitlines()) if ln.strip()), "")
    return Result(
        "broken-config",
        "`mtp serve` on a checkpoint whose config.json is cut short",
        f"exit {code}, {'a traceback' if 'Traceback' in out else 'no traceback'} in its output; last line: "
        f"{last[-100:]!r}",
        "Traceback" in out or code in (None, 0),
        {"exit_code": code, "output_tail": out[-1500:]},
    )


def host_redirect(url: str) -> Result:
    """A redirect never sends the client to the host named in its Host header."""
    r = httpx.get(f"{url}/predict/", headers={"Host": "evil.example"}, follow_redirects=False, timeout=10)
    location = r.headers.get("location", "")
    return Result(
        "host-redirect",
        "GET /predict/ with Host: evil.example",
        f"{r.status_code}" + (f" Location: {location}" if location else ""),
        "evil.example" in location,
    )


def head_probes(url: str) -> Result:
    """HEAD /health and HEAD /ready answer as GET does (probes that use HEAD)."""
    got = {p: httpx.head(url + p, timeout=10).status_code for p in ("/health", "/ready")}
    return Result(
        "head-probes",
        "HEAD /health and HEAD /ready",
        ", ".join(f"{p} {s}" for p, s in got.items()),
        any(s != 200 for s in got.values()),
    )


# ---- the suite ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    name: str
    run: Callable[[Lab], Result]


def _shared(fn: Callable[[str], Result], settings: Mapping[str, object] = COMMON) -> Callable[[Lab], Result]:
    return lambda lab: fn(lab.shared(settings).url)


def _idle(lab: Lab) -> Result:
    with lab.dedicated(idle_timeout_s=3, max_connections=64) as srv:
        return idle_connections(srv.url, 3.0, 64)


def _timeout(lab: Lab) -> Result:
    with lab.dedicated(request_timeout_s=1, max_new_tokens=LONG) as srv:
        return timeout_traceback(srv)


# Ordered so that attacks on the same shared server run together.
ATTACKS = [
    Attack("keyless-queue-lock", _shared(keyless_queue_lock, AUTH)),
    Attack("keyless-malformed", _shared(keyless_malformed, AUTH)),
    Attack("keyless-post-routes", _shared(keyless_post_routes, AUTH)),
    Attack("head-refusal-framing", _shared(head_refusal_framing, AUTH)),
    Attack("lone-surrogate", _shared(lone_surrogate)),
    Attack("logit-bias-keys", _shared(logit_bias_keys)),
    Attack("host-redirect", _shared(host_redirect)),
    Attack("head-probes", _shared(head_probes)),
    Attack("top-k-overflow", _shared(top_k_overflow)),
    Attack("stop-stream-leak", _shared(stop_stream_leak)),
    Attack("streamed-logprobs", _shared(streamed_logprobs)),
    Attack("oversized-fanout", _shared(oversized_fanout)),
    Attack("refused-multi-prompt", _shared(refused_multi_prompt)),
    Attack("disconnect-nonstream", _shared(disconnect_nonstream)),
    Attack("tokenize-bomb", _shared(tokenize_bomb)),
    Attack("token-id-body", _shared(token_id_body)),
    Attack("huge-header", _shared(huge_header)),
    Attack("cut-short-body", _shared(cut_short_body, SHORT_BODY)),
    Attack("chat-default-max-tokens", _shared(chat_default_max_tokens, SHORT_BODY)),
    Attack("timeout-traceback", _timeout),
    Attack("idle-connections", _idle),
    Attack("shutdown-bounds", shutdown_bounds),
    Attack("draft-policy-contention", draft_policy_contention),
    Attack("broken-config", lambda lab: broken_config(lab.checkpoint, lab.workdir)),
]


def run_attacks(
    attacks: list[Attack], checkpoint: str, torch_threads: int = 1, compile_steps: bool = True
) -> list[Result]:
    results = []
    defaults = {"torch_threads": torch_threads or None, "compile": None if compile_steps else "false"}
    with tempfile.TemporaryDirectory(prefix="mtp-attack-") as tmp, Lab(checkpoint, Path(tmp), defaults) as lab:
        for i, attack in enumerate(attacks, 1):
            t0 = time.monotonic()
            try:
                r = attack.run(lab)
            except Exception as exc:  # report it and go on with the next attack
                r = Result(
                    attack.name, "-", f"the attack failed: {type(exc).__name__}: {exc}"[:300], None, crashed=True
                )
            r.seconds = round(time.monotonic() - t0, 1)
            print(f"[{i}/{len(attacks)}] {r.name}: {r.verdict} ({r.seconds:.1f} s)", file=sys.stderr, flush=True)
            results.append(r)
    return results


def table(results: list[Result]) -> str:
    rows = ["| attack | what was measured | result | verdict |", "| --- | --- | --- | --- |"]
    for r in results:
        cells = (r.name, r.measured, r.result, r.verdict)
        rows.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(rows)


def commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--only", default="", help="comma-separated attack names: " + ", ".join(a.name for a in ATTACKS))
    ap.add_argument("--out", default=None, help="also write the results here as JSON")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="MTP_TORCH_THREADS of the servers (0: torch's default). One thread keeps a busy neighbour on a "
        "2-core machine from slowing every step many times over; draft-policy-contention always uses the default",
    )
    ap.add_argument(
        "--no-compile",
        action="store_true",
        help="eager steps (MTP_COMPILE=false) in every server: each starts in seconds, where compiling the "
        "default model's steps at one thread takes minutes per server, longer on a cold cache",
    )
    args = ap.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - {a.name for a in ATTACKS}
    if unknown:
        ap.error(f"unknown attack(s): {', '.join(sorted(unknown))}")
    attacks = [a for a in ATTACKS if not names or a.name in names]
    t0 = time.monotonic()
    load = os.getloadavg()[0]
    results = run_attacks(attacks, args.checkpoint, args.torch_threads, compile_steps=not args.no_compile)
    print(table(results))
    if args.out:
        report = {
            "code": str(ROOT),
            "commit": commit(),
            "checkpoint": args.checkpoint,
            "seconds": round(time.monotonic() - t0, 1),
            "load_average_1m_at_start": load,
            "torch_threads": args.torch_threads,
            "compile": not args.no_compile,
            "defects": sum(bool(r.defect) for r in results),
            "attacks": [{**asdict(r), "verdict": r.verdict} for r in results],
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.exit(1 if any(r.defect or r.crashed for r in results) else 0)


if __name__ == "__main__":
    main()
