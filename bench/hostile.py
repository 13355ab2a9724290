"""Hostile inputs against a real server: prints a Markdown table of each input and its status.

    python -m bench.hostile

Each case states the status it must get; the command exits non-zero if any case differs
or if the server stops answering /health between cases.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx

from app.config import DEFAULT_CHECKPOINT
from bench.service import server


@dataclass
class Case:
    name: str
    expect: int
    send: Callable[[str], int]


def post_raw(path: str, body: bytes, content_type: str = "application/json") -> Callable[[str], int]:
    def send(url: str) -> int:
        return httpx.post(url + path, content=body, headers={"content-type": content_type}, timeout=60).status_code

    return send


def post_json(path: str, payload: object) -> Callable[[str], int]:
    return post_raw(path, json.dumps(payload).encode())


def slow_drip(url: str, seconds: float = 15.0) -> int:
    """Send a small body one byte per second; the server must give up (408) before we finish."""
    u = urlparse(url)
    body = b'{"inputs": "' + b"a" * 40 + b'"}'
    with socket.create_connection((u.hostname, u.port), timeout=seconds + 10) as s:
        head = (
            "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        s.sendall(head.encode())
        t0 = time.monotonic()
        for b in body:
            try:
                s.sendall(bytes([b]))
            except OSError:
                break
            s.settimeout(1.0)
            try:
                data = s.recv(4096)
                if data:
                    return int(data.split(b" ")[1])
            except TimeoutError:
                pass
            if time.monotonic() - t0 > seconds:
                break
        s.settimeout(10)
        data = s.recv(4096)
        return int(data.split(b" ")[1]) if data else 0


def cases(ctx: int, vocab: int, body_limit: int) -> list[Case]:
    deep = b"[" * 100_000 + b"]" * 100_000
    long_prompt_ids = [1 + i % (vocab - 1) for i in range(ctx)]  # valid ids whatever the vocabulary
    return [
        Case("valid /predict (control)", 200, post_json("/predict", {"inputs": "ROMEO:"})),
        Case(
            f"huge JSON body ({body_limit * 2} bytes)",
            413,
            post_raw("/predict", b'{"inputs": "' + b"a" * body_limit * 2 + b'"}'),
        ),
        Case("deeply nested JSON (100k levels)", 413 if len(deep) > body_limit else 422, post_raw("/predict", deep)),
        Case(
            "nested JSON within the size limit (20k levels)", 422, post_raw("/predict", b"[" * 20_000 + b"]" * 20_000)
        ),
        Case("invalid UTF-8 in the body", 422, post_raw("/predict", b'{"inputs": "\xff\xfe\xfa"}')),
        Case("malformed JSON", 422, post_raw("/predict", b'{"inputs": ')),
        Case("NaN temperature", 422, post_raw("/generate", b'{"inputs": "a", "parameters": {"temperature": NaN}}')),
        Case("Infinity top_p", 422, post_raw("/generate", b'{"inputs": "a", "parameters": {"top_p": Infinity}}')),
        Case(
            "negative max_new_tokens",
            422,
            post_json("/generate", {"inputs": "a", "parameters": {"max_new_tokens": -5}}),
        ),
        Case(
            "huge max_new_tokens (10^30)",
            422,
            post_json("/generate", {"inputs": "a", "parameters": {"max_new_tokens": 10**30}}),
        ),
        Case("negative token id", 422, post_json("/predict", {"input_ids": [-1, 2]})),
        Case("token id = vocab size", 422, post_json("/predict", {"input_ids": [vocab]})),
        Case("huge seed (2^80)", 422, post_json("/generate", {"inputs": "a", "parameters": {"seed": 2**80}})),
        Case(
            f"prompt at the context length ({ctx} ids, /predict)",
            200,
            post_json("/predict", {"input_ids": long_prompt_ids[:ctx]}),
        ),
        Case(
            f"prompt just over the context ({ctx + 1} ids)", 422, post_json("/predict", {"input_ids": [1] * (ctx + 1)})
        ),
        Case(
            "prompt + max_new_tokens over the context",
            422,
            post_json("/generate", {"inputs": "a " * ctx, "parameters": {"max_new_tokens": 8}}),
        ),
        Case("5000 stop sequences", 422, post_json("/generate", {"inputs": "a", "parameters": {"stop": ["x"] * 5000}})),
        Case(f"top_n equal to the vocabulary ({vocab})", 422, post_json("/predict", {"inputs": "a", "top_n": vocab})),
        Case("empty inputs", 422, post_json("/generate", {"inputs": ""})),
        Case("unknown field", 422, post_json("/predict", {"inputs": "a", "temperature": 1})),
        Case("wrong type (inputs: 5)", 422, post_json("/predict", {"inputs": 5})),
        Case("1000 inputs in one request", 422, post_json("/predict", {"inputs": ["a"] * 1000})),
        Case("text/plain body", 422, post_raw("/predict", b"hello", "text/plain")),
        Case("slow-drip body (1 byte/s)", 408, slow_drip),
        Case("valid /generate after all of the above (control)", 200, post_json("/generate", {"inputs": "ROMEO:"})),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    args = ap.parse_args()
    body_limit = 1_048_576
    failed = 0
    with server(args.checkpoint, "cpu", body_timeout_s=5, max_body_bytes=body_limit) as srv:
        url = srv.url
        info = httpx.get(url + "/info").json()
        print("| input | expected | got |\n| --- | --- | --- |")
        for case in cases(info["max_seq_len"], info["vocab_size"], body_limit):
            got = case.send(url)
            healthy = httpx.get(url + "/health", timeout=10).status_code == 200
            mark = "" if got == case.expect and healthy else " **MISMATCH**"
            failed += bool(mark)
            print(f"| {case.name} | {case.expect} | {got}{mark} |")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
