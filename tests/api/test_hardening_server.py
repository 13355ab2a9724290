"""Regression tests for the second hardening round against real `mtp serve` processes:
client disconnects, idle connections, the connection cap, shutdown bounds and quiet logs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.attack.lab import Lab
from bench.attack.lifecycle import log_reader_stall
from tests.api.test_server import metric, wait_until
from tests.conftest import start_server

PROMPT = "To be, or not to be"


def raw_post(url: str, path: str, payload: dict[str, Any]) -> socket.socket:
    """Send a whole POST over a raw socket and return the socket, unread."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(payload).encode()
    s = socket.create_connection((host, int(port)), timeout=10)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    s.sendall(head.encode() + body)
    return s


def closed_by_server(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_a_non_streaming_request_is_cancelled_when_its_client_leaves(server_factory: Callable[..., Any]) -> None:
    srv = server_factory(forward_delay_s=0.05)
    before = metric(srv.url, "mtp_generated_tokens_total")
    sockets = [
        raw_post(srv.url, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 40, "speculative": False}})
        for _ in range(2)
    ]
    wait_until(lambda: metric(srv.url, "mtp_running_sequences") == 2)
    for s in sockets:
        s.close()
    wait_until(lambda: metric(srv.url, "mtp_running_sequences") == 0, timeout=3)
    generated = metric(srv.url, "mtp_generated_tokens_total") - before
    assert generated < 40  # they stopped well before their 2 x 40 tokens
    assert metric(srv.url, "mtp_request_failures_total", reason="cancelled") >= 2


@pytest.mark.parametrize("close", ["FIN", "RST"])
def test_requests_pipelined_on_a_connection_end_when_their_client_leaves(
    server_factory: Callable[..., Any], close: str
) -> None:
    """Three requests pipelined on one connection, the client gone while the first runs: uvicorn
    reads nothing more while a request waits its turn, so it saw no close, and told only the
    newest request of a disconnect. Now the first is cancelled within a step or so, the others
    never start, and nothing logs a traceback (writing to the closed connection did)."""
    srv = server_factory(forward_delay_s=0.05)
    host, port = srv.url.removeprefix("http://").split(":")
    body = json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": 40, "speculative": False}}).encode()
    head = (
        f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    before = metric(srv.url, "mtp_generated_tokens_total")
    s = socket.create_connection((host, int(port)), timeout=10)
    if close == "RST":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.sendall((head.encode() + body) * 3)
    wait_until(lambda: metric(srv.url, "mtp_running_sequences") == 1)
    s.close()
    wait_until(lambda: metric(srv.url, "mtp_running_sequences") == 0, timeout=3)
    time.sleep(1.0)  # a pipelined request, if one started, would be running by now
    assert metric(srv.url, "mtp_running_sequences") == 0
    assert metric(srv.url, "mtp_generated_tokens_total") - before < 40  # the first stopped early, the others never ran
    assert metric(srv.url, "mtp_request_failures_total", reason="cancelled") == 1
    log = srv.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


def test_idle_and_header_drip_connections_are_closed(server_factory: Callable[..., Any]) -> None:
    srv = server_factory(MTP_IDLE_TIMEOUT_S="1")
    host, port = "127.0.0.1", srv.port
    idle = socket.create_connection((host, port))
    drip = socket.create_connection((host, port))
    stop = threading.Event()

    def dripping() -> None:
        for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100:
            if stop.is_set():
                return
            try:
                drip.send(bytes([b]))
            except OSError:
                return
            time.sleep(0.2)

    threading.Thread(target=dripping, daemon=True).start()
    t0 = time.monotonic()
    assert closed_by_server(idle, within=4)
    assert closed_by_server(drip, within=4)
    stop.set()
    assert time.monotonic() - t0 < 4
    assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200


def test_connections_beyond_the_cap_are_refused_before_descriptors_run_out(
    server_factory: Callable[..., Any],
) -> None:
    srv = server_factory(MTP_MAX_CONNECTIONS="8", MTP_IDLE_TIMEOUT_S="1")
    held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(8)]
    extra = socket.create_connection(("127.0.0.1", srv.port))
    extra.settimeout(5)
    assert extra.recv(100).startswith(b"HTTP/1.1 503")
    assert all(closed_by_server(s, within=4) for s in held)  # idle: closed, their places free again
    assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200


def reply_to_head(port: int, head: bytes) -> bytes:
    """Send a request head over a raw socket and read the reply until the server closes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(head)
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    s.close()
    return b"".join(chunks)


def test_a_request_head_over_the_limit_gets_431_in_its_familys_envelope_and_is_closed(
    server_factory: Callable[..., Any],
) -> None:
    srv = server_factory(MTP_MAX_HEADER_BYTES="4096")
    assert httpx.get(f"{srv.url}/info", timeout=5).json()["limits"]["max_header_bytes"] == 4096
    assert httpx.get(f"{srv.url}/health", headers={"X-Pad": "a" * 3000}, timeout=5).status_code == 200
    # 32 MB in one header: the parser's appends made this seconds of event-loop time before
    t0 = time.monotonic()
    reply = reply_to_head(srv.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (32 << 20) + b"\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and b"connection: close" in head
    assert json.loads(body) == {"error": "request line and headers larger than 4096 bytes", "error_type": "too_large"}
    assert time.monotonic() - t0 < 5
    # a long URL on an OpenAI route: OpenAI's envelope
    reply = reply_to_head(srv.port, b"GET /v1/models?" + b"q" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and json.loads(body)["error"]["code"] == 431
    # a body is not a head (an 8 kB input is served), and heads are counted one by one (pipelined)
    r = httpx.post(f"{srv.url}/tokenize", json={"inputs": "a" * 8_000}, timeout=10)
    assert r.status_code == 200, r.text
    pipelined = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 3000 + b"\r\n\r\n"
    reply = reply_to_head(srv.port, pipelined * 5 + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.count(b"HTTP/1.1 200 ") == 6  # 18 kB of heads on one connection, none over 4096 bytes


def read_stream(url: str, out: list[Any]) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 40, "speculative": False}}
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=30) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))


def test_sigterm_drains_then_ends_running_streams_with_an_error_and_exits_0_in_time(
    server_factory: Callable[..., Any],
) -> None:
    srv = server_factory("--drain-timeout-s", "1", forward_delay_s=0.08)  # a stream: 40 x 0.08 s = 3.2 s
    events: list[Any] = []
    reader = threading.Thread(target=read_stream, args=(srv.url, events))
    reader.start()
    wait_until(lambda: len(events) >= 2)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(timeout=10)
    took = time.monotonic() - t0
    reader.join(timeout=5)
    assert code == 0
    assert took < 1 + 2, took
    assert events[-1]["error_type"] == "not_ready" and "shutting down" in events[-1]["error"]
    assert "Traceback" not in srv.log()


def test_a_second_signal_exits_130_within_a_second(server_factory: Callable[..., Any]) -> None:
    srv = server_factory("--drain-timeout-s", "30", forward_delay_s=0.08)
    events: list[Any] = []
    reader = threading.Thread(target=read_stream, args=(srv.url, events))
    reader.start()
    wait_until(lambda: len(events) >= 2)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(timeout=10)
    assert time.monotonic() - t0 < 1.0
    assert code == 130
    reader.join(timeout=5)
    assert "Traceback" not in srv.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_exits_at_once(tmp_path: Path, checkpoint: Path, sig: signal.Signals) -> None:
    """The warm-up (here slowed: every forward pass sleeps 0.5 s) runs on the inference thread,
    where no signal reaches it; the process exits without waiting for it."""
    srv = start_server(checkpoint, tmp_path, "--device", "cpu", forward_delay_s=0.5)
    try:
        wait_until(lambda: "loaded " in srv.log(), timeout=60)  # the checkpoint is in: the warm-up runs
        time.sleep(1.0)
        t0 = time.monotonic()
        srv.proc.send_signal(sig)
        code = srv.proc.wait(timeout=10)
        assert time.monotonic() - t0 < 2.0
        assert code == 128 + sig
        assert f"{sig.name} during start-up: exiting before serving" in srv.log()
    finally:
        srv.stop()


def test_a_stream_that_times_out_logs_one_line_and_no_traceback(server_factory: Callable[..., Any]) -> None:
    srv = server_factory("--request-timeout-s", "1", forward_delay_s=0.08)
    events: list[Any] = []
    read_stream(srv.url, events)
    assert events[-1]["error_type"] == "timeout"
    r = httpx.post(f"{srv.url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 40}}, timeout=30)
    assert r.status_code == 504
    time.sleep(0.3)
    log = srv.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    assert log.count("request timed out after 1s") >= 2


def test_a_broken_checkpoint_prints_its_message_without_a_traceback(tmp_path: Path, checkpoint: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in checkpoint.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "max_seq_len": 10**9}))
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--checkpoint", str(ckpt), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "max_seq_len=1000000000 needs" in done.stderr and "GiB is available" in done.stderr
    assert "Traceback" not in done.stderr


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_idle_server_does_not_spin(server_factory: Callable[..., Any]) -> None:
    """The engine's worker blocks when there is no work: an idle server uses under 0.1 s of CPU in 5 s."""
    srv = server_factory()
    assert httpx.post(f"{srv.url}/generate", json={"inputs": PROMPT}, timeout=30).status_code == 200
    time.sleep(1.0)  # the request's last step and its metrics settle
    before = cpu_seconds(srv.proc.pid)
    time.sleep(5.0)
    assert cpu_seconds(srv.proc.pid) - before < 0.1


def read_reply(s: socket.socket, buf: bytearray, head_only: bool = False) -> tuple[bytes, dict[str, str], bytes]:
    """One HTTP/1.1 reply from a raw socket (its status line, headers and body: none for a
    reply to HEAD, whatever its Content-Length says); buf keeps what was read beyond it."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"closed before a reply: {bytes(buf)!r}"
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    buf[:] = rest
    if head_only:
        return status.encode(), headers, b""
    while len(buf) < int(headers.get("content-length", "0")):
        buf += s.recv(65536)
    body = bytes(buf[: int(headers.get("content-length", "0"))])
    del buf[: len(body)]
    return status.encode(), headers, body


def post_head(path: str, length: int, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json", f"Content-Length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_refusals_made_from_the_head_match_the_doors_and_keep_the_connection(
    server_factory: Callable[..., Any],
) -> None:
    """`mtp serve` answers a request refused from its head alone (no key, a full queue) before
    uvicorn makes a request cycle for it. The reply is the one the door (RequestContext) makes
    for a request that reaches it, the connection stays usable, and the refusal is counted."""
    srv = server_factory(MTP_MAX_QUEUE_SIZE="1", MTP_API_KEY="k3y")
    body = json.dumps({"inputs": PROMPT}).encode()
    auth = "Authorization: Bearer k3y"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as holder:
        holder.sendall(post_head("/generate", 23, auth) + b'{"inputs": ')  # holds the one place
        probe = {"inputs": PROMPT}  # /predict until refused: the holder's place is taken
        wait_until(
            lambda: (
                httpx.post(f"{srv.url}/predict", json=probe, headers={"Authorization": "Bearer k3y"}).status_code == 429
            )
        )
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        buf = bytearray()
        # answered at the head: the body is not needed for the reply, and is dropped when it comes
        s.sendall(post_head("/generate", len(body), auth, "X-Request-Id: early-1"))
        status, early, early_body = read_reply(s, buf)
        s.sendall(body)
        # pipelined behind a GET, the same request reaches the door through uvicorn's cycle
        s.sendall(
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            + post_head("/generate", len(body), auth, "X-Request-Id: door-1")
            + body
        )
        assert read_reply(s, buf)[0].startswith(b"HTTP/1.1 200")
        door_status, door, door_body = read_reply(s, buf)
        assert status == door_status == b"HTTP/1.1 429 Too Many Requests"
        assert early_body == door_body and json.loads(early_body) == {
            "error": "queue full; retry later",
            "error_type": "overloaded",
        }
        assert early.pop("x-request-id") == "early-1" and door.pop("x-request-id") == "door-1"
        assert early.keys() == door.keys() and all(early[k] == door[k] for k in early if k != "date"), (early, door)
        assert early["retry-after"] == "1" and "connection" not in early
        # no key: 401 from the head, in the OpenAI envelope on /v1, on the same connection
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, reply = read_reply(s, buf)
        assert status.startswith(b"HTTP/1.1 401") and json.loads(reply)["error"]["code"] == 401
        assert len(headers["x-request-id"]) == 32
        # the same refusal to HEAD: its head declares the body, and no body follows it
        s.sendall(b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        status, head_headers, _ = read_reply(s, buf, head_only=True)
        assert status.startswith(b"HTTP/1.1 401") and head_headers["content-length"] == headers["content-length"]
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, reply = read_reply(s, buf)
        assert status.startswith(b"HTTP/1.1 200"), (status, reply)
        assert json.loads(reply)["status"] == "ok" and not buf
        s.close()
        # Expect: 100-continue, or Connection: close: the reply closes the connection
        for extra in ("Expect: 100-continue", "Connection: close"):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as c:
                c.sendall(post_head("/v1/completions", len(body), auth, extra))
                status, headers, reply = read_reply(c, bytearray())
                assert status.startswith(b"HTTP/1.1 429") and headers["connection"] == "close", extra
                assert json.loads(reply)["error"]["type"] == "overloaded"
                assert closed_by_server(c, within=2)
        assert metric(srv.url, "mtp_requests_total", route="/generate", status="429") == 2
        assert metric(srv.url, "mtp_requests_total", route="/v1/completions", status="429") == 2
        assert metric(srv.url, "mtp_requests_total", route="unmatched", status="401") == 2  # GET and HEAD
    # the place is free again: the same request is served
    r = httpx.post(
        f"{srv.url}/generate",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}},
        headers={"Authorization": "Bearer k3y"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    time.sleep(0.3)  # the server writes its log lines within 0.1 s of logging them (app/logs.py)
    log = srv.log()  # the connections answered from the head closed cleanly
    assert "Traceback" not in log and "Exception in callback" not in log, log


def test_a_body_cut_short_by_its_timeout_or_the_size_limit_closes_the_connection(
    server_factory: Callable[..., Any],
) -> None:
    """A 408 (the declared body did not all arrive in time) or a 413 part-way through a chunked
    body: kept open, the connection's parser still waited for the rest of the body and took the
    client's next request as that, and the client hung until the idle timeout."""
    srv = server_factory(MTP_BODY_TIMEOUT_S="0.5", MTP_MAX_BODY_BYTES="2048")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(post_head("/tokenize", 40) + b'{"inputs": "To be"}')  # 19 of the 40 bytes declared
        status, headers, reply = read_reply(s, bytearray())
        assert status.startswith(b"HTTP/1.1 408") and headers["connection"] == "close", (status, headers)
        assert json.loads(reply)["error_type"] == "timeout"
        assert closed_by_server(s, within=2)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        head = b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        s.sendall(head + b"%x\r\n%s\r\n" % (3000, b" " * 3000))  # over the limit, and the body goes on
        status, headers, reply = read_reply(s, bytearray())
        assert status.startswith(b"HTTP/1.1 413") and headers["connection"] == "close", (status, headers)
        assert closed_by_server(s, within=2)
    # a body that arrives whole keeps its connection
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        body = b'{"inputs": "To be"}'
        buf = bytearray()
        for _ in range(2):
            s.sendall(post_head("/tokenize", len(body)) + body)
            status, headers, _ = read_reply(s, buf)
            assert status.startswith(b"HTTP/1.1 200") and "connection" not in headers


def pipelined_gets(port: int, path: str, n: int, rcvbuf: int) -> socket.socket:
    """n GET requests for path sent at once on one connection with a receive buffer of about
    rcvbuf bytes, none of the replies read yet."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() * n)
    return s


def test_a_client_that_takes_none_of_its_replies_is_closed_and_a_slow_reader_is_not(
    server_factory: Callable[..., Any],
) -> None:
    """Replies that a client never reads fill the kernel's buffers, and the rest waits in the
    server's memory: the connection stayed open for good (counted against max_connections) and
    its replies stayed in memory. A connection whose client takes no byte of a pending reply
    between two of the idle checker's looks is now closed; one that reads slowly keeps going."""
    # The checker looks every 2 s. The slow reader takes 64 KB every 0.2 s: a kernel's send
    # buffer takes more from the server once about half of what it queues has gone, which at
    # that pace comes well within a look.
    srv = server_factory(MTP_IDLE_TIMEOUT_S="2")
    size = len(httpx.get(f"{srv.url}/openapi.json", timeout=10).content)
    stalled_n = 8 * 2**20 // size + 1  # 8 MB of replies, more than the kernel's buffers hold
    stalled = pipelined_gets(srv.port, "/openapi.json", stalled_n, 4096)
    slow_n = 2 * 2**20 // size + 1  # 2 MB, read 64 KB at a time with pauses shorter than the checker's interval
    slow = pipelined_gets(srv.port, "/openapi.json", slow_n, 65536)
    got = bytearray()
    slow.settimeout(10)
    t0 = time.monotonic()
    while got.count(b"HTTP/1.1 200 OK") < slow_n or not got.endswith(b"}"):
        chunk = slow.recv(65536)
        assert chunk, f"the slow reader was cut off after {len(got)} bytes"
        got += chunk
        time.sleep(0.2)
    assert time.monotonic() - t0 > 3  # it did read slowly, across several looks of the checker
    # The stalled client reads now, long after the checker's looks: what its kernel holds, and
    # then the end of a connection the server dropped, without the replies it still held.
    stalled.settimeout(5)
    received = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := stalled.recv(1 << 20):
            received += chunk
    assert received.count(b"HTTP/1.1 200 OK") < stalled_n
    assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200


def test_a_server_whose_log_nobody_reads_keeps_answering(tmp_path: Path, checkpoint: Path) -> None:
    """The event loop wrote each access line to stderr itself, so a reader of the log that
    stalled (a full pipe: a log shipper that fell behind) stopped the whole server: with nobody
    reading, it answered 528 `/health` requests, then none. Lines are now written by a thread of
    their own (app/logs.py); once the reader comes back, every line is there. The attack of the
    same name (bench/attack/lifecycle.py) runs it against the tiny checkpoint."""
    result = log_reader_stall(Lab(str(checkpoint), tmp_path, {"compile": False, "torch_threads": 1}), requests=1500)
    assert result.details == {"answered": 1500, "stalled_at": None, "access_lines": 1500}, result.result
    assert result.verdict == "ok"


def read_to_close(s: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """A whole reply that ends where its connection does: its status line, headers and body as sent."""
    data = bytearray()
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}, body


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}}),
        # greedy, as TGI's default is: a sampled reply may draw EOS within its 6 tokens
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "stream": True, "temperature": 0}),
    ],
)
def test_a_stream_to_an_http_1_0_client_is_not_chunked_and_ends_with_the_connection(
    server: Any, path: str, payload: dict[str, Any]
) -> None:
    """HTTP/1.0 has no chunked coding (RFC 9112, section 6.1): a stream's events arrive as
    they are, and the closed connection ends the reply. HTTP/1.1 clients still get chunks."""
    body = json.dumps(payload).encode()
    head = f"POST {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head.encode() + body)
        status, headers, sent = read_to_close(s)
    assert status.split()[1] == "200"
    assert "transfer-encoding" not in headers and "content-length" not in headers
    assert headers["connection"] == "close"
    data = [line.removeprefix("data:").strip() for line in sent.decode().split("\n\n") if line.startswith("data:")]
    assert len(sent.decode().rstrip("\n").split("\n\n")) == len(data)  # nothing but events: no chunk sizes
    if path.startswith("/v1/"):
        assert data.pop() == "[DONE]"
        assert json.loads(data[-1])["choices"][0]["finish_reason"] == "length"
    else:
        assert [json.loads(d)["index"] for d in data] == list(range(6))
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:  # the same request in HTTP/1.1
        s.sendall(head.replace("HTTP/1.0", "HTTP/1.1").encode() + body)
        status, headers, _ = read_reply(s, bytearray(), head_only=True)
    assert headers["transfer-encoding"] == "chunked"


def test_a_forwarded_for_header_is_believed_only_from_a_proxy_the_settings_name(
    server_factory: Callable[..., Any],
) -> None:
    """The per-client share of the queue and the access log go by the client's address. A client
    on this host could name another one in X-Forwarded-For on each connection and pass for many
    clients (uvicorn trusts loopback proxies by default): so no proxy is trusted unless named."""
    spoof = {"X-Forwarded-For": "203.0.113.7"}
    srv = server_factory()
    assert httpx.get(f"{srv.url}/health", headers=spoof, timeout=10).status_code == 200
    wait_until(lambda: "GET /health" in srv.log(), 5)  # access lines are written in batches
    assert "203.0.113.7" not in srv.log()
    proxied = server_factory("--forwarded-allow-ips", "127.0.0.1")
    assert httpx.get(f"{proxied.url}/health", headers=spoof, timeout=10).status_code == 200
    wait_until(lambda: "203.0.113.7" in proxied.log(), 5)


def data_segments_received(s: socket.socket) -> int:
    """Segments carrying data that this TCP socket has received (Linux: tcp_info's tcpi_data_segs_in)."""
    return int(struct.unpack_from("I", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256), 152)[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts segments with Linux's TCP_INFO")
@pytest.mark.parametrize(
    "method, path, payload",
    [
        ("GET", "/health", None),
        ("POST", "/generate", {"inputs": "To be", "parameters": {"max_new_tokens": 4}}),
        ("POST", "/predict", {"inputs": "To be"}),
        ("POST", "/generate", {}),  # a 422
    ],
)
def test_a_reply_leaves_in_one_tcp_segment(server: Any, method: str, path: str, payload: Any) -> None:
    """uvicorn writes a reply's head and its body in two calls; sent as written they were two
    segments (the socket sets no delay), and a client woke for each. The connection's writes of
    one turn of the event loop now go out in one send."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        for _ in range(2):  # and again on the kept-alive connection
            before = data_segments_received(s)
            if payload is None:
                s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            else:
                body = json.dumps(payload).encode()
                s.sendall(post_head(path, len(body)) + body)
            status, headers, reply = read_reply(s, bytearray())
            assert reply and int(headers["content-length"]) == len(reply), status
            time.sleep(0.05)  # anything sent after the reply would have arrived by now
            assert data_segments_received(s) - before == 1, status
