"""`mtp serve`: uvicorn with a bounded drain on SIGTERM/SIGINT and guarded connections.

On the first signal the service turns /ready to 503 and answers new work with 503, while
in-flight requests (streams included) finish, up to the drain timeout. Requests still running
then end with an error (a final SSE error event on streams), and the process exits 0 within
drain_timeout_s + 2 s. A second signal exits with status 130 within a second. A signal during
start-up (loading the model, compiling its steps) exits at once, with 128 + the signal's number.

Connections: one that has not sent a complete request header within idle_timeout_s (after
connecting, or after its last response) is closed, one whose request head (request line and
headers) grows past max_header_bytes gets a 431 and is closed, and beyond max_connections open
ones (kept below the file-descriptor limit) a new connection gets a 503 and is closed. A request
that the door refuses from its head alone (no API key, a declared body over the limit, a full
queue) is answered by the protocol itself, before uvicorn makes a request cycle and a task for it.
A reply of unknown length (a stream) to an HTTP/1.0 request ends where its connection does,
without the chunked coding that 1.0 does not have.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import json
import logging
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
import urllib.parse
from http import HTTPStatus
from types import FrameType
from typing import Any

import httptools
import torch
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from app.api.deps import ServiceState
from app.api.errors import KINDS, error_body
from app.api.middleware import request_id
from app.config import Settings
from app.engine.types import EngineNotReady
from app.logs import request_id_var, setup_logging
from app.main import create_app
from app.model.checkpoint import CheckpointError, check_checkpoint
from app.model.config import ModelConfig
from app.model.model import MTPTransformer

log = logging.getLogger(__name__)
SWITCH_INTERVAL_S = 0.0005
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
TRIM_THRESHOLD = 256 * 2**20
FD_RESERVE = 64  # descriptors kept for the model files, logs and the listening socket
LINGER_S = 2.0  # after a 431, what the client still sends is read and dropped this long before the close
SECOND_SIGNAL_EXIT_S = 0.5  # a second signal: streams get their error event, then the process exits
BUSY = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def head_too_large(limit: int, openai: bool) -> bytes:
    """The 431 reply to a request head over the limit, in its API family's envelope."""
    kind = KINDS["head_too_large"]
    body = json.dumps(error_body(f"request line and headers larger than {limit} bytes", kind.error_type, openai, 431))
    return (
        "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n{body}"
    ).encode()


class _NoWaiter:
    def set(self) -> None:
        """Nothing waits for an answered request's body."""


class _Answered:
    """The cycle of a request answered by GuardedProtocol itself: complete, nothing to read.
    uvicorn's protocol reads these attributes of a complete cycle."""

    response_complete = True
    message_event = _NoWaiter()


_ANSWERED: Any = _Answered()


async def send_until_close(cycle: RequestResponseCycle, message: Any) -> None:
    """uvicorn's send for a cycle of an HTTP/1.0 request, whose reply of unknown length (no
    Content-Length: an SSE stream) uvicorn would send with chunked coding, which 1.0 lacks
    (RFC 9112, section 6.1: a server must not send it to a 1.0 client, which would read the
    chunk sizes as text). Such a body is sent as it comes, and ends where the connection does
    (section 6.3; uvicorn closes every 1.0 connection after its reply and says so)."""
    if message["type"] == "http.response.start" and not cycle.response_started:
        names = {name.lower() for name, _ in message.get("headers", [])}
        body = cycle.scope["method"] != "HEAD" and message["status"] not in (204, 304)
        if body and b"content-length" not in names and b"transfer-encoding" not in names:
            cycle.chunked_encoding = False  # uvicorn then adds no Transfer-Encoding
            cycle.until_close = True  # type: ignore[attr-defined]
    elif message["type"] == "http.response.body" and getattr(cycle, "until_close", False):
        cycle.expected_content_length = len(message.get("body", b""))  # each part is all uvicorn expects
    await RequestResponseCycle.send(cycle, message)


PEER_CHECK_S = 0.25  # how often a connection with pipelined requests is asked whether its client left
_HUNG_UP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR


def peer_gone(sock: Any) -> bool:
    """The client closed or reset the connection (seen without reading from it)."""
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), _HUNG_UP)
    return any(events & _HUNG_UP for _, events in poller.poll(0))


class CountingTransport:
    """A connection's transport, counting the bytes written to it: less what it still buffers,
    that is how many the kernel has taken (GuardedProtocol._reader_stalled).

    What is written in one turn of the event loop goes to the socket in one send, at the end of
    that turn (a cork, as Node's socket.cork() until the next tick): uvicorn writes a reply's
    head and its body in two calls, and each was a send() of its own, so every reply left as two
    TCP segments (no delay is set on the socket) and woke its client twice. A close or an EOF
    sends what is held first; an abort drops it, as it drops the transport's own buffer. At
    HOLD_BYTES held it is sent at once: the transport's own buffer then fills as before, and
    its flow control (uvicorn waits for room before the next write) holds a writer back."""

    HOLD_BYTES = 65536  # asyncio's default high-water mark for a transport's write buffer

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.inner = transport
        self.loop = loop
        self.written = 0
        self._held: list[bytes] = []  # written this turn, not yet sent
        self._held_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        chunk = bytes(data)  # a copy of a buffer its writer may reuse
        if not chunk:
            return
        self.written += len(chunk)
        if not self._held:
            self.loop.call_soon(self.flush)
        self._held.append(chunk)
        self._held_bytes += len(chunk)
        if self._held_bytes >= self.HOLD_BYTES:
            self.flush()

    def flush(self) -> None:
        held, self._held, self._held_bytes = self._held, [], 0
        if held and not self.inner.is_closing():  # closed since: nothing can go out any more
            self.inner.write(held[0] if len(held) == 1 else b"".join(held))

    def writelines(self, parts: Any) -> None:
        for data in parts:
            self.write(data)

    def get_write_buffer_size(self) -> int:
        return self.inner.get_write_buffer_size() + self._held_bytes

    def taken(self) -> int:
        return self.written - self.get_write_buffer_size()

    def write_eof(self) -> None:
        self.flush()
        self.inner.write_eof()

    def close(self) -> None:
        self.flush()
        self.inner.close()

    def abort(self) -> None:
        self._held, self._held_bytes = [], 0
        self.inner.abort()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self.inner, name)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol with an idle/header timeout, a send timeout and a cap on open
    connections.

    uvicorn closes a keep-alive connection only after a response; one that never sends a
    request, or drips its header a byte at a time, would stay open for good and hold a file
    descriptor. Every idle_timeout_s a connection that has no request in progress and has
    not started one since the last look is closed.

    A client that never reads its replies holds its connection as long: once the kernel's
    buffers are full, the rest of a reply waits in this process, and a stream's writer waits
    for room. At the same looks, a connection with reply bytes waiting of which the kernel
    has taken none since the last look is dropped (nginx's send_timeout), and what it held
    is freed.
    """

    idle_timeout_s = 30.0
    max_connections = 2048
    max_header_bytes = 65536
    service_app: Any = None  # the app; its `door` (RequestContext) refuses requests from their heads
    _in_head = True  # the bytes arriving now belong to a request head (none of its body yet)
    _head_bytes = 0  # bytes of the current request head counted so far
    _heads = 0  # request heads completed on this connection
    _refused = False  # a 431 has been sent: the connection only waits to be closed
    _running: RequestResponseCycle | None = None  # the cycle whose task was started last
    _peer_watch: asyncio.TimerHandle | None = None  # _check_peer, while requests are pipelined

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport: Any = CountingTransport(transport, self.loop)  # the request cycles write through it
        self._taken = -1  # bytes the kernel had taken at the idle checker's last look
        if len(self.connections) > self.max_connections:
            transport.write(BUSY)
            transport.close()
            return
        self._seen = self.cycle
        self._idle = self.loop.call_later(self.idle_timeout_s, self._check_idle)

    def _check_idle(self) -> None:
        if self._reader_stalled():
            log.warning("client %s took no byte of its reply for %.0f s: dropped", self.client, self.idle_timeout_s)
            self.transport.abort()
            return
        cycle = self.cycle
        if cycle is self._seen and (cycle is None or cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()  # nothing arrived, or only part of a header: free the descriptor
            return
        self._seen = cycle
        self._idle = self.loop.call_later(self.idle_timeout_s, self._check_idle)

    def _reader_stalled(self) -> bool:
        """Reply bytes wait in this process, and the kernel has taken none since the last look."""
        taken, waiting = self.transport.taken(), self.transport.get_write_buffer_size()
        stalled = waiting > 0 and taken == self._taken
        self._taken = taken
        return stalled

    def data_received(self, data: bytes) -> None:
        """The parser (httptools) and uvicorn gather a request's URL and each header value by
        appending every piece that arrives, which costs time quadratic in their length, on the
        event loop: a 64 MB header held it for 5 s, and every other client waited (`python -m
        bench.attack --only huge-header`). So a head that grows past max_header_bytes is
        answered 431 and its connection closed. A chunk is counted when it starts inside a head
        and no head ends within it (all of it is head), so a head is cut within a read or two
        of the limit."""
        if self._refused:  # the 431 is out; what the client still sends is dropped until the close
            return
        counted, heads = self._in_head, self._heads
        super().data_received(data)
        if not counted or self._heads != heads or self.transport.is_closing():
            return  # the chunk began outside a head, or a head ended within it
        self._head_bytes += len(data)
        if self._head_bytes > self.max_header_bytes:
            log.warning("request head over %d bytes from %s: 431, closed", self.max_header_bytes, self.client)
            if self.cycle is not None and not self.cycle.response_complete:
                self.transport.close()  # a pipelined request's reply is still due: no reply can go in order
                return
            openai = getattr(self, "url", b"").startswith(b"/v1/")
            self.transport.write(head_too_large(self.max_header_bytes, openai))
            # Close after a moment, not at once: a client still sending its head would get a
            # reset instead of the reply (a lingering close, as nginx does).
            self._refused = True
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes = False, 0
        self._heads += 1
        if self._refused_at_head():
            return
        before = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not before and cycle is not None and cycle.scope["http_version"] == "1.0":
            # read by its task, which has not run yet (or waits its turn behind a pipelined reply)
            cycle.send = functools.partial(send_until_close, cycle)  # type: ignore[method-assign]
        if self.pipeline and self._peer_watch is None:  # uvicorn paused reading: watch for the client leaving
            self._peer_watch = self.loop.call_later(PEER_CHECK_S, self._check_peer)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._running = cycle  # uvicorn's `cycle` is the newest parsed, not the one running
        super()._start_asgi_task(cycle, app)

    def _check_peer(self) -> None:
        """While a pipelined request waits its turn, uvicorn reads nothing from the connection,
        so it would not see the client close or reset it, and the request running would run to
        its end for nobody. The socket is asked (poll, nothing read) whether the client hung up;
        if so the connection is closed and every request on it ends as disconnected."""
        self._peer_watch = None
        if not self.pipeline or self.transport.is_closing():
            return
        if peer_gone(self.transport.get_extra_info("socket")):
            self.transport.close()
            return
        self._peer_watch = self.loop.call_later(PEER_CHECK_S, self._check_peer)

    def _refused_at_head(self) -> bool:
        """Answer here, with no request cycle or task, a request the door refuses from its head
        (RequestContext.refuse_at_head: no key, a declared body over the limit, a full queue).

        uvicorn would make a cycle and a task for it, run it through the door, and write the
        reply's head and body in two writes; in a burst against a full queue that was most of
        the event loop's work. The reply is the same bytes the door sends, with uvicorn's
        default headers and the request id. The connection stays open unless the client asked
        to close it or sent `Expect: 100-continue` (it may then never send the body this
        reply declines, and the next request could not be told from it). Whatever body does
        arrive is dropped: the parser reports it to a cycle already complete."""
        door = getattr(self.service_app, "door", None)
        busy = self.cycle is not None and not self.cycle.response_complete
        if door is None or busy or self.parser.should_upgrade():
            return False  # no app yet; a pipelined request waits for its turn in uvicorn's queue
        start = time.perf_counter()
        try:
            method = self.parser.get_method().decode("ascii")
            url = httptools.parse_url(self.url)
            raw = url.path.decode("ascii")
        except (httptools.HttpParserError, UnicodeDecodeError):
            return False  # uvicorn's own handling answers it
        path = self.root_path + (urllib.parse.unquote(raw) if "%" in raw else raw)
        headers = dict(self.headers)
        reply = door.refuse_at_head(method, path, headers)
        if reply is None:
            return False
        rid = request_id(headers)
        keep_alive = self.parser.should_keep_alive() and not self.expect_100_continue
        status = HTTPStatus(reply.status_code)
        head = [b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode())]
        for name, value in [*self.server_state.default_headers, *reply.raw_headers, (b"x-request-id", rid.encode())]:
            head += [name, b": ", value, b"\r\n"]
        if not keep_alive:
            head.append(b"connection: close\r\n")
        body = b"" if method == "HEAD" else reply.body  # a HEAD reply's head declares the body, never sends it
        self.transport.write(b"".join([*head, b"\r\n", body]))
        self.cycle = _ANSWERED  # complete: the parser's body callbacks drop what still arrives
        if self.access_log and self.access_logger.isEnabledFor(logging.INFO):
            token = request_id_var.set(rid)
            target = path + ("?" + url.query.decode("ascii", "replace") if url.query else "")
            client = f"{self.client[0]}:{self.client[1]}" if self.client else ""
            version = self.parser.get_http_version()
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', client, method, target, version, status.value)
            request_id_var.reset(token)
        door.refused_at_head(path, reply.status_code, time.perf_counter() - start)
        if keep_alive:
            self.on_response_complete()  # what uvicorn does after a reply: the keep-alive timer
        else:
            self.transport.close()
        return True

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # what follows is the next request's head

    def connection_lost(self, exc: Exception | None) -> None:
        if (idle := getattr(self, "_idle", None)) is not None:
            idle.cancel()
        if self._peer_watch is not None:
            self._peer_watch.cancel()
        # uvicorn tells only its newest cycle: with requests pipelined, the one running would
        # neither see the disconnect nor stop writing to the closed transport (a traceback per
        # reply), and the ones queued would never start. Every one is told; none starts.
        for cycle in (self._running, *(c for c, _ in self.pipeline)):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self.pipeline.clear()
        super().connection_lost(exc)


def connection_cap(wanted: int) -> int:
    """wanted, kept below the file-descriptor limit (raised to the hard limit first where allowed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    cap = min(wanted, max(1, soft - FD_RESERVE))
    if cap < wanted:
        log.warning("max_connections %d lowered to %d: the file-descriptor limit is %d", wanted, cap, soft)
    return cap


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # Everything alive now (modules, the model, the app) lives as long as the process: move
        # it out of the collector's reach, so a full collection under load walks only request
        # garbage (measured: one gen-2 pass over the startup heap stalled the loop 130 ms).
        gc.collect()
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is not None and not self.started:
            self._exit_during_startup(sig)
            return
        if self._loop is None:
            super().handle_exit(sig, frame)  # not serving yet: uvicorn's own exit
            return
        if self._draining:
            self._exit_now()
            return
        self._draining = True
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()) if self._loop else None)

    def _exit_during_startup(self, sig: int) -> None:
        """A signal while the model loads and its steps compile (minutes on a cold cache). That
        work runs on the inference thread and cannot be interrupted, and uvicorn would look at
        its exit flag only after it: Ctrl-C, `docker stop` or a rollout would wait out the whole
        start-up. Nothing is served yet, so the process exits now, with 128 + the signal."""
        log.warning("%s during start-up: exiting before serving", signal.Signals(sig).name)
        logging.shutdown()
        os._exit(128 + sig)

    def _exit_now(self) -> None:
        """Second signal: every running request ends with its error, and the process exits 130."""
        log.warning("second signal: ending running requests and exiting with 130")
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._fail_all)

        def leave() -> None:
            logging.shutdown()
            os._exit(130)

        threading.Timer(SECOND_SIGNAL_EXIT_S, leave).start()

    def _fail_all(self) -> None:
        engine = self.app.state.service.engine
        if engine is not None:
            engine.fail_all(EngineNotReady("the server is shutting down"))

    async def _drain(self) -> None:
        state: ServiceState = self.app.state.service
        state.draining = True
        state.metrics.ready.set(0)
        log.info("draining: /ready is 503, new work gets 503; waiting up to %.0fs", self.drain_timeout_s)
        finished = True
        if state.engine is not None:
            finished = await state.engine.drain(self.drain_timeout_s)
            if not finished:  # the deadline: what still runs ends now, streams with an error event
                state.engine.fail_all(EngineNotReady("the server is shutting down (drain timeout)"))
        await asyncio.sleep(0.2)  # let the last response frames reach their clients
        log.info("drain %s; shutting down", "complete" if finished else "timed out")
        self.should_exit = True


def fix_mmap_threshold(threshold: int) -> bool:
    """Pin glibc's mmap threshold (mallopt M_MMAP_THRESHOLD) and its trim threshold; True if set.

    glibc raises the threshold each time a large mmapped block is freed, so later activations
    of that size come from the heap, and freed heap memory mostly stays in the process: RSS
    then steps up with every new high-water mark of batch x prompt length and never comes
    down. A fixed threshold keeps large tensors in their own mappings, returned when freed.
    Pinning it also ends glibc's adaptive trim threshold, so that is pinned high: trimming
    the heap after every freed tensor would cost page faults in every forward pass.
    """
    if threshold <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        ok = False
    if not ok:
        log.warning("could not set the malloc mmap threshold (not glibc?); RSS may keep its peaks")
    return ok


def memory_needed(cfg: ModelConfig, max_batch: int) -> int:
    """Bytes the model takes in float32 (the largest dtype served): weights, position table, KV caches."""
    with torch.device("meta"):
        params = sum(p.numel() for p in MTPTransformer(cfg).parameters())
    cache = 2 * cfg.n_layers * max_batch * cfg.num_heads * (cfg.max_seq_len + cfg.k - 1) * cfg.head_dim
    return 4 * (params + cfg.max_seq_len * cfg.d_model + cache)


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            line = next(x for x in f if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return None


def preflight(settings: Settings) -> None:
    """The checks that need no weights, before uvicorn would turn a failure into a traceback."""
    cfg = check_checkpoint(settings.checkpoint)
    need, free = memory_needed(cfg, settings.max_batch_size), available_memory()
    if settings.device in ("auto", "cpu") and free is not None and need > free:
        raise CheckpointError(
            f"{settings.checkpoint}: the model with KV caches for max_batch_size={settings.max_batch_size} "
            f"x max_seq_len={cfg.max_seq_len} needs {need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB is available"
        )


def serve(settings: Settings) -> int:
    setup_logging(settings.log_level, settings.log_json)
    try:  # a broken checkpoint: its message and exit 2, no traceback (unless MTP_LOG_LEVEL=DEBUG)
        preflight(settings)
    except CheckpointError as exc:
        log.error("cannot serve: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return 2
    fix_mmap_threshold(settings.malloc_mmap_threshold)
    # The inference thread holds the GIL between torch ops; a short switch interval lets the
    # event loop get it back quickly, so /health, /metrics and 429s stay fast at full load.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    app = create_app(settings)
    protocol: Any = type(
        "Guarded",
        (GuardedProtocol,),
        {
            "idle_timeout_s": settings.idle_timeout_s,
            "max_connections": connection_cap(settings.max_connections),
            "max_header_bytes": settings.max_header_bytes,
            "service_app": app,
        },
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        http=protocol,
        timeout_graceful_shutdown=1,  # the drain already ended every request; this only closes sockets
        timeout_keep_alive=5,
        # X-Forwarded-For names the client only from a proxy named here: uvicorn's default trusts
        # any on this host, where one client could name another on each connection and pass for
        # many (the door's per-client share, the access log)
        proxy_headers=settings.forwarded_allow_ips is not None,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )
    server = DrainingServer(config, app, settings.drain_timeout_s)
    log.info("listening on http://%s:%d (API docs at /docs)", settings.host, settings.port)
    try:
        server.run()
    except KeyboardInterrupt:  # a second signal during the drain: stop now, as asked
        log.warning("second signal: exiting without waiting for the drain")
        return 130
    return 0 if server.started else 1
