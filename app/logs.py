"""Logging setup: plain or JSON lines, each carrying the request id, written by a thread of
their own a moment after they are logged."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from contextvars import ContextVar
from typing import TextIO

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")  # set per request by the middleware


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out)


class BufferedStreamHandler(logging.StreamHandler):
    """A StreamHandler whose lines are written by a thread of its own, at most `flush_s` after
    they are logged, many to a write (nginx's `access_log ... buffer= flush=`); WARNING and above
    wake the writer at once.

    A plain StreamHandler writes on the thread that logs, and a write blocks while the stream's
    reader does not read (a full pipe: a log shipper or a container's log driver that fell
    behind). The event loop logs a line for every request, so such a stall stopped the whole
    server: with its stderr a pipe nobody read, it answered 528 `/health` requests and then
    nothing. Here the thread that logs only formats the line and appends it to a queue; a stalled
    stream blocks the writer thread alone. Past `capacity` waiting lines, lines below WARNING are
    dropped and counted, and the count is written once the stream takes lines again; WARNING and
    above have a reserve of as many again (dropped past twice `capacity`), so that a flood of
    access lines does not drop the line that says what went wrong. flush() (which
    logging.shutdown() calls at exit) writes what is left, waiting at most `flush_wait_s` for a
    writer that is stuck."""

    def __init__(
        self, stream: TextIO | None = None, flush_s: float = 0.1, capacity: int = 10_000, flush_wait_s: float = 1.0
    ) -> None:
        super().__init__(stream)
        self.flush_s = flush_s
        self.capacity = capacity
        self.flush_wait_s = flush_wait_s
        self._lines: deque[str] = deque()  # append and popleft are atomic: no lock between logger and writer
        self._dropped = 0  # counted under self.lock by the threads that log
        self._reported = 0  # of them, how many the writer has reported (only under self._io)
        self._io = threading.Lock()  # one writer at a time, in order; never taken with self.lock waited for
        self._wake = threading.Event()
        self._urgent = threading.Event()
        self._writer: threading.Thread | None = None
        self._pid = 0

    def emit(self, record: logging.LogRecord) -> None:  # called under self.lock
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        if len(self._lines) >= (self.capacity if record.levelno < logging.WARNING else 2 * self.capacity):
            self._dropped += 1
        else:
            self._lines.append(line)
        if self._writer is None or self._pid != os.getpid():  # the first line, or a forked child's
            self._pid = os.getpid()
            self._writer = threading.Thread(target=self._write_forever, name="mtp-log-writer", daemon=True)
            self._writer.start()
        if record.levelno >= logging.WARNING:
            self._urgent.set()
        if not self._wake.is_set():
            self._wake.set()

    def _write_forever(self) -> None:
        while True:
            self._wake.wait()
            self._urgent.wait(self.flush_s)  # gather the lines logged meanwhile
            self._wake.clear()
            self._urgent.clear()
            try:
                self._write(wait=None)
            except Exception:
                self.handleError(logging.makeLogRecord({"msg": "the log's writer thread could not write"}))

    def flush(self) -> None:
        """Write the lines waiting; raises as StreamHandler.flush does (logging.shutdown() ignores
        a closed stream's errors)."""
        self._write(wait=self.flush_wait_s)

    def _write(self, wait: float | None) -> None:
        if not self._io.acquire(timeout=-1 if wait is None else wait):
            return  # the writer is stuck on the stream: leave its lines rather than hang
        try:
            lines = [self._lines.popleft() for _ in range(len(self._lines))]
            if (dropped := self._dropped - self._reported) > 0:
                lines.append(f"[{dropped} log lines dropped: the log's reader fell behind]{self.terminator}")
                self._reported += dropped
            stream = self.stream
            if lines and stream is not None:
                stream.write("".join(lines))
                if hasattr(stream, "flush"):
                    stream.flush()
        finally:
            self._io.release()


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    handler = BufferedStreamHandler()
    handler.addFilter(RequestIdFilter())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
