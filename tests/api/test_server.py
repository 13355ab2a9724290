"""End to end against a real `python -m app.cli serve` (uvicorn) process: HTTP over a socket,
streaming, metrics, client disconnects, and the graceful drain on SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

PROMPT = "To be, or not to be"


def metric(base_url: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"{name}{labels} not exposed")


def events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.startswith("data: "):
            yield json.loads(line.removeprefix("data: "))


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_predict_over_http(server: Any) -> None:
    r = httpx.post(f"{server.url}/predict", json={"inputs": PROMPT, "top_n": 3}, headers={"X-Request-Id": "e2e-1"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "e2e-1"
    body = r.json()
    assert body["positions"] == body["k"] == 3 and len(body["results"][0]["positions"]) == 3
    r = httpx.post(f"{server.url}/predict", json={"inputs": ""})
    assert r.status_code == 422 and set(r.json()) == {"error", "error_type"}


def test_streamed_generate_over_http(server: Any) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 9, "details": True}}
    want = httpx.post(f"{server.url}/generate", json=body, timeout=30).json()
    with httpx.stream("POST", f"{server.url}/generate", json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        got = list(events(r.iter_lines()))
    assert [e["index"] for e in got] == list(range(9))
    assert got[-1]["generated_text"] == want["generated_text"]
    assert "".join(e["token"]["text"] for e in got) == want["generated_text"]
    assert got[-1]["details"]["finish_reason"] == "length"


def test_metrics_over_http(server: Any) -> None:
    httpx.post(f"{server.url}/predict", json={"inputs": PROMPT})
    httpx.post(f"{server.url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    text = httpx.get(f"{server.url}/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"mtp_requests", "mtp_ready", "mtp_queue_depth", "mtp_forward_duration_seconds"} <= names
    assert metric(server.url, "mtp_ready") == 1
    assert metric(server.url, "mtp_requests_total", route="/predict", status="200") >= 1
    assert metric(server.url, "mtp_generated_tokens_total") >= 3


def test_chunked_body_above_limit_gets_413_over_http(server: Any) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": "'
        for _ in range(40):
            yield b"x" * 32768  # 1.25 MiB in all, above the 1 MiB default limit
        yield b'"}'

    r = httpx.post(f"{server.url}/predict", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413
    assert r.json()["error_type"] == "too_large"
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_dropped_stream_frees_its_slot_over_http(server_factory: Callable[..., Any]) -> None:
    srv = server_factory(forward_delay_s=0.04)  # 50 tokens take about 2 s
    cancelled = metric(srv.url, "mtp_request_failures_total", reason="cancelled")
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 50, "speculative": False}}
    with httpx.stream("POST", f"{srv.url}/generate_stream", json=body, timeout=30) as r:
        assert r.status_code == 200, (r.read(), srv.log())
        stream = events(r.iter_lines())  # kept referenced: a collected generator would close the stream
        first = next(stream)
        assert first["index"] == 0
        assert metric(srv.url, "mtp_running_sequences") == 1
    # leaving the block closed the connection after the first event
    wait_until(lambda: metric(srv.url, "mtp_running_sequences") == 0)
    assert metric(srv.url, "mtp_queue_depth") == 0
    wait_until(lambda: metric(srv.url, "mtp_request_failures_total", reason="cancelled") == cancelled + 1)
    r = httpx.post(f"{srv.url}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}, timeout=30)
    assert r.status_code == 200


def test_stream_outlives_the_body_timeout(server_factory: Callable[..., Any]) -> None:
    """The body deadline covers the request body only: a stream that runs past it (its
    response waits on receive() for a disconnect) completes."""
    srv = server_factory(forward_delay_s=0.05, MTP_BODY_TIMEOUT_S="1")  # 40 tokens take about 2 s
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 40, "speculative": False}}
    with httpx.stream("POST", f"{srv.url}/generate_stream", json=body, timeout=30) as r:
        assert r.status_code == 200
        got = list(events(r.iter_lines()))
    assert got[-1]["details"] is not None or got[-1]["generated_text"] is not None, got[-1]
    assert sum("token" in e for e in got) == 40, srv.log()[-2000:]
    time.sleep(0.3)  # the server writes its log lines within 0.1 s of logging them (app/logs.py)
    assert "Exception" not in srv.log()


def test_slow_drip_body_gets_408(server_factory: Callable[..., Any]) -> None:
    srv = server_factory(MTP_BODY_TIMEOUT_S="1")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        sock.sendall(b'Content-Length: 100\r\n\r\n{"inputs": ')
        reply = b""  # the rest of the body never comes
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < 20:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.decode("latin-1").partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 408"), head
    assert json.loads(body)["error_type"] == "timeout"


def test_sigterm_drains_in_flight_stream_then_exits_zero(server_factory: Callable[..., Any]) -> None:
    srv = server_factory("--drain-timeout-s", "30", forward_delay_s=0.05)  # 40 tokens take about 2 s
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 40, "speculative": False}}
    with httpx.stream("POST", f"{srv.url}/generate_stream", json=body, timeout=30) as r:
        stream = events(r.iter_lines())
        first = next(stream)
        srv.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{srv.url}/ready", timeout=5).status_code == 503, timeout=5)
        refused = httpx.post(f"{srv.url}/predict", json={"inputs": PROMPT}, timeout=5)
        assert refused.status_code == 503 and refused.json()["error_type"] == "not_ready"
        assert srv.proc.poll() is None  # still serving the stream
        rest = list(stream)
    assert [e["index"] for e in [first, *rest]] == list(range(40))
    assert rest[-1]["details"]["finish_reason"] == "length"
    assert rest[-1]["details"]["generated_tokens"] == 40
    assert srv.proc.wait(timeout=30) == 0
    assert "drain complete" in srv.log()


def test_second_signal_exits_at_once_without_a_traceback(server_factory: Callable[..., Any]) -> None:
    srv = server_factory("--drain-timeout-s", "30", forward_delay_s=0.05)
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 40, "speculative": False}}
    with httpx.stream("POST", f"{srv.url}/generate_stream", json=body, timeout=30) as r:
        next(events(r.iter_lines()))
        srv.proc.send_signal(signal.SIGINT)  # starts the drain; the stream keeps it waiting
        wait_until(lambda: httpx.get(f"{srv.url}/ready", timeout=5).status_code == 503, timeout=5)
        srv.proc.send_signal(signal.SIGINT)
        assert srv.proc.wait(timeout=15) == 130
    assert "second signal" in srv.log()
    assert "Traceback" not in srv.log()
