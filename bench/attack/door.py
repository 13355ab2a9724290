"""Attacks at the door: authentication, the queue's places and admission, and where a request
lands (redirects, HEAD probes)."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from collections import Counter
from typing import Any

import httpx

from bench.attack.lab import (
    KEY,
    LONG,
    TOKENS,
    Result,
    address,
    counts,
    error_message,
    metric,
    ms,
    read_reply,
    request_bytes,
    status_of,
    timed,
    wait_idle,
)

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


def stalled_bodies(url: str, n: int, per_address: int | None = None) -> list[socket.socket]:
    """n connections that each send a POST /v1/completions head and the first byte of a body that
    never comes: the door takes a queue place for each. per_address: at most this many from each
    loopback address (127.0.0.2, .3, ...), under the per-client share of arriving bodies."""
    headers = {"Content-Type": "application/json", "Content-Length": "100"}
    head = request_bytes("POST", "/v1/completions", headers=headers)
    stalled: list[socket.socket] = []
    try:
        for i in range(n):
            source = (f"127.0.0.{2 + i // per_address}", 0) if per_address else None
            s = socket.create_connection(address(url), timeout=10, source_address=source)
            stalled.append(s)
            s.sendall(head + b"{")
    except BaseException:
        for s in stalled:
            s.close()
        raise
    return stalled


def refused_multi_prompt(url: str, queue_size: int = 16, max_tokens: int = LONG, watch_s: float = 3.0) -> Result:
    """A multi-prompt completion refused for lack of queue room must not leave its admitted prompts running.

    The request has as many prompts as the queue holds (more is refused as invalid, before any is
    admitted); half the places are first taken by requests whose bodies stall at the door, so the
    first half of its prompts is admitted and the next one refused."""
    wait_idle(url)
    held = queue_size // 2
    stalled = stalled_bodies(url, held)
    try:
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


# Each route that queues work for the engine, with a small valid body.
QUEUEING_ROUTES: dict[str, dict[str, Any]] = {
    "/generate": {"inputs": "ROMEO:", "parameters": {"max_new_tokens": 2}},
    "/": {"inputs": "ROMEO:", "parameters": {"max_new_tokens": 2}},  # TGI's compat route for /generate
    "/generate_stream": {"inputs": "ROMEO:", "parameters": {"max_new_tokens": 2}},
    "/predict": {"inputs": "ROMEO:"},
    "/v1/completions": {"prompt": "ROMEO:", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "ROMEO:"}], "max_tokens": 2},
}


def _probe(url: str, path: str, body: bytes, whole: bool, patience: float) -> tuple[int, str, float]:
    """POST `path` on a new connection with the body whole or only its first byte: (status, Retry-After,
    seconds to the reply's head); status -1 when no reply came within `patience`."""
    head = request_bytes("POST", path, headers={"Content-Type": "application/json", "Content-Length": str(len(body))})
    t0 = time.monotonic()
    with socket.create_connection(address(url), timeout=10) as s:
        s.sendall(head + (body if whole else body[:1]))
        s.settimeout(patience)
        try:
            status, headers, _ = read_reply(s, bytearray())
        except (TimeoutError, ConnectionError):
            return -1, "", time.monotonic() - t0
    return status, headers.get("retry-after", ""), time.monotonic() - t0


def door_shedding(url: str, patience: float = 1.0) -> Result:
    """With the queue full, every route that queues work is refused at the door: 429 with Retry-After
    at once, before its body has arrived. POST / (TGI's compat route) and /v1/chat/completions were
    not in the door's set: a request still sending its body got no answer, and a whole one was refused
    (429) only by the engine's queue, after it had been read and parsed.

    The queue is filled by stalled bodies, as many per loopback address (127.0.0.2, .3, ...) as the
    per-client share of arriving bodies lets one client hold."""
    wait_idle(url)
    limits = httpx.get(f"{url}/info", timeout=10).json()["limits"]
    q, share = limits["max_queue_size"], limits["max_pending_bodies_per_client"]
    probes: dict[str, dict[str, Any]] = {}
    stalled = stalled_bodies(url, q, max(share - 1, 1))  # at most share - 1 per address: none is refused
    try:
        time.sleep(0.5)
        t_full = time.monotonic()
        for path, payload in QUEUEING_ROUTES.items():
            body = json.dumps(payload).encode()
            for label, whole in (("body pending", False), ("whole body", True)):
                status, retry, took = _probe(url, path, body, whole, patience)
                probes[f"{path} {label}"] = {"status": status, "retry_after": retry, "seconds": round(took, 4)}
        held_s = time.monotonic() - t_full
        last = _probe(url, "/generate", json.dumps(QUEUEING_ROUTES["/generate"]).encode(), False, patience)
    finally:
        for s in stalled:
            s.close()
    wait_idle(url)
    full = probes["/generate body pending"]["status"] == 429 and last[0] == 429  # the control, first and last
    unshed = {k: p for k, p in probes.items() if p["status"] != 429 or not p["retry_after"] or p["seconds"] > patience}

    def show(p: dict[str, Any]) -> str:
        if p["status"] == -1:
            return f"no reply in {patience:.1f} s"
        return (
            f"{p['status']}"
            + (f" (Retry-After: {p['retry_after']})" if p["retry_after"] else "")
            + f" in {ms(p['seconds'])}"
        )

    named = [k for k in probes if k.startswith(("/ ", "/v1/chat/")) or k in unshed]  # the routes once left out
    others = [p["seconds"] for k, p in probes.items() if k not in named]
    return Result(
        "door-shedding",
        f"queue of {q} filled by stalled bodies ({share - 1} per loopback address); POST to each route that "
        "queues work, its body pending (first byte sent) and whole; shed: 429 with Retry-After within "
        f"{patience:.1f} s",
        "; ".join(f"{k}: {show(probes[k])}" for k in named)
        + (f"; the other {len(others)}: 429 with Retry-After, slowest {ms(max(others))}" if others else "")
        + ("" if full else "; the queue was not full throughout (control: /generate, first and last)"),
        bool(unshed) if full else None,
        {"probes": probes, "control_last": last[0], "probing_s": held_s},
    )


# ---- attacks: where a request lands --------------------------------------------------------------


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
    """HEAD answers as GET does (probes and link checkers that use HEAD): /health and /ready,
    and every other GET route."""
    paths = ("/health", "/ready", "/info", "/metrics", "/v1/models", "/docs", "/openapi.json")
    got = {p: httpx.head(url + p, timeout=10).status_code for p in paths}
    return Result(
        "head-probes",
        "HEAD " + ", ".join(paths),
        ", ".join(f"{p} {s}" for p, s in got.items()),
        any(s != 200 for s in got.values()),
    )
