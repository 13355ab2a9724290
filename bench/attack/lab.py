"""What every attack shares: the servers it runs against (Lab), raw-socket and HTTP helpers,
a streamed reply as a client saw it, and the Result each attack returns."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from bench.server import HOST, Server

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
