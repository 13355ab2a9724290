"""Attacks on connections: clients that leave, refusals framed on a keep-alive connection, bodies
cut short, idle and dripping sockets, and the connection cap."""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
import struct
import time
from collections.abc import Mapping

import httpx

from bench.attack.lab import (
    KEY,
    LONG,
    RUNNING,
    TOKENS,
    Result,
    address,
    closed_within,
    metric,
    ms,
    read_reply,
    request_bytes,
    status_of,
    wait_idle,
)
from bench.server import Server

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


def unread_replies(url: str, idle_timeout_s: float = 3.0, cap: int = 16, megabytes: int = 4) -> Result:
    """Clients that ask for large replies and never read them hold no connection place for good.

    `cap` connections (the server's MTP_MAX_CONNECTIONS) each send, pipelined, enough GETs of
    /openapi.json for `megabytes` of replies, with a 4 KB receive buffer, and read nothing.
    The kernel's buffers fill and the rest waits in the server; left open, the connections
    hold every place, and a new client is refused for as long as they stay. After two idle
    intervals and slack a new client asks for /health; then each attacker reads what reached
    it, and a reply count short of what it asked for shows the server dropped it."""
    size = len(httpx.get(f"{url}/openapi.json", timeout=10).content)
    n = megabytes * 2**20 // size + 1
    socks = []
    for _ in range(cap):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(address(url))
        s.sendall(request_bytes("GET", "/openapi.json") * n)
        socks.append(s)
    time.sleep(2 * idle_timeout_s + 3.0)
    probe = probe_health(url, timeout=5)
    dropped = 0
    for s in socks:
        s.settimeout(5)
        got = bytearray()
        with contextlib.suppress(OSError):  # a reset, or a read that waited 5 s for more
            while chunk := s.recv(1 << 20):
                got += chunk
        dropped += got.count(b"HTTP/1.1 200 OK") < n
        s.close()
    return Result(
        "unread-replies",
        f"{cap} connections (MTP_MAX_CONNECTIONS={cap}, MTP_IDLE_TIMEOUT_S={idle_timeout_s:g}) each asking for "
        f"{n} × GET /openapi.json ({n * size / 2**20:.1f} MB) with a 4 KB receive buffer, none read for "
        f"{2 * idle_timeout_s + 3:.0f} s",
        f"/health from a new client then: {probe}; connections the server dropped before their replies were "
        f"read: {dropped} of {cap}",
        probe != "200" or dropped < cap,
        {"probe": probe, "dropped": dropped, "replies_each": n, "reply_bytes": size},
    )


def pipelined_leave(srv: Server, n: int = 16, new_tokens: int = LONG, rounds: int = 2) -> Result:
    """A client that pipelines requests on one connection and leaves while the first runs.

    uvicorn reads nothing more from a connection while a pipelined request waits its turn, and
    tells only the newest request of a disconnect: the running request neither stopped nor
    noticed the closed connection, and writing its reply logged a traceback. Each round sends a
    non-streaming /v1/completions of `n` choices alone, then three on one connection, and
    closes the connection 0.3 s later, with a FIN and with a RST. Judged as disconnect-nonstream
    judges one request: the defect is a pipelined round that went on to generate 90 % or more of
    what its first request had left at the close, or a traceback in the server's log."""
    url = srv.url
    body = json.dumps({"prompt": "ROMEO:", "max_tokens": new_tokens, "n": n, "temperature": 1.0}).encode()
    one = request_bytes("POST", "/v1/completions", body)
    after: dict[str, list[float]] = {}
    left: dict[str, list[float]] = {}
    log_before = len(srv.log())
    for _ in range(rounds):
        for close in ("FIN", "RST"):
            for count in (1, 3):
                wait_idle(url)
                start = metric(url, TOKENS)
                s = socket.create_connection(address(url), timeout=5)
                if close == "RST":
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.sendall(one * count)
                time.sleep(0.3)
                at_close = metric(url, TOKENS)
                s.close()
                time.sleep(3.0)
                label = f"{count} on the connection, {close}"
                after.setdefault(label, []).append(metric(url, TOKENS) - at_close)
                left.setdefault(label, []).append(n * new_tokens - (at_close - start))
    wait_idle(url)
    log = srv.log()[log_before:]
    tracebacks = log.count("Traceback") + log.count("Exception in ASGI application")
    ran_on = [
        a >= 0.9 * r
        for label in after
        if label.startswith("3 ")
        for a, r in zip(after[label], left[label], strict=True)
        if r > 0
    ]
    return Result(
        "pipelined-leave",
        f"a /v1/completions of n = {n} × {new_tokens} tokens alone, and three pipelined on one connection, the "
        f"connection closed (FIN, RST) 0.3 s after; {TOKENS} in the 3 s after the close against what the first "
        f"request had left ({rounds} rounds), and the server's log",
        "; ".join(
            f"{label}: " + ", ".join(f"{a:.0f} of {r:.0f}" for a, r in zip(after[label], left[label], strict=True))
            for label in after
        )
        + f" tokens; {tracebacks} tracebacks in the log",
        None if not ran_on else any(ran_on) or tracebacks > 0,
        {"tokens_after_close": after, "tokens_left_at_close": left, "tracebacks": tracebacks},
    )
