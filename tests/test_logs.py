"""app/logs.py: log lines written by a thread of their own, so that the thread that logs never
waits on the stream."""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable

from app.logs import BufferedStreamHandler


class Pipe(io.StringIO):
    """A stream whose writes block while it is shut, as a pipe's do once its reader stalls."""

    def __init__(self) -> None:
        super().__init__()
        self.open = threading.Event()
        self.open.set()
        self.writes = 0

    def write(self, s: str) -> int:
        self.open.wait()
        self.writes += 1
        return super().write(s)


def logger_to(handler: logging.Handler) -> logging.Logger:
    log = logging.getLogger(f"test-logs-{id(handler)}")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_lines_arrive_in_order_many_to_a_write() -> None:
    stream = Pipe()
    log = logger_to(BufferedStreamHandler(stream, flush_s=0.05))
    for i in range(300):
        log.info("line %d", i)
    wait_for(lambda: stream.getvalue().count("\n") == 300)
    assert stream.getvalue().splitlines() == [f"line {i}" for i in range(300)]
    assert stream.writes < 30


def test_a_warning_is_written_at_once_not_after_the_interval() -> None:
    stream = Pipe()
    log = logger_to(BufferedStreamHandler(stream, flush_s=30))
    log.info("before")
    log.warning("now")
    wait_for(lambda: "now" in stream.getvalue(), timeout=5)
    assert stream.getvalue().splitlines() == ["before", "now"]


def test_a_stalled_stream_never_blocks_the_thread_that_logs_and_drops_are_counted() -> None:
    stream = Pipe()
    handler = BufferedStreamHandler(stream, flush_s=0.01, capacity=100, flush_wait_s=0.2)
    log = logger_to(handler)
    stream.open.clear()  # the reader stalls
    log.info("first")
    wait_for(lambda: not handler._lines)  # the writer has taken it, and is stuck writing it
    t0 = time.perf_counter()
    for i in range(1000):
        log.info("line %d", i)
    log.warning("last")
    assert time.perf_counter() - t0 < 1.0  # nothing waited on the stream
    t0 = time.perf_counter()
    handler.flush()  # as at exit: gives up on a stuck writer instead of hanging
    assert time.perf_counter() - t0 < 1.0
    stream.open.set()  # the reader comes back
    wait_for(lambda: "dropped" in stream.getvalue())
    lines = stream.getvalue().splitlines()
    assert lines == [
        "first",
        *(f"line {i}" for i in range(100)),
        "last",  # a warning: kept past the capacity
        "[900 log lines dropped: the log's reader fell behind]",
    ]
    log.info("again")
    wait_for(lambda: stream.getvalue().endswith("again\n"))
    assert stream.getvalue().count("dropped") == 1


def test_warnings_have_a_reserve_of_their_own_and_a_bound() -> None:
    """A full buffer drops the lines below WARNING; warnings and errors go on being kept, up to
    twice the capacity, past which they are dropped and counted too."""
    stream = Pipe()
    handler = BufferedStreamHandler(stream, flush_s=0.01, capacity=100)
    log = logger_to(handler)
    stream.open.clear()
    log.info("first")
    wait_for(lambda: not handler._lines)
    for i in range(150):
        log.info("line %d", i)
    for i in range(150):
        log.error("error %d", i)
    stream.open.set()
    wait_for(lambda: "dropped" in stream.getvalue())
    assert stream.getvalue().splitlines() == [
        "first",
        *(f"line {i}" for i in range(100)),
        *(f"error {i}" for i in range(100)),
        "[100 log lines dropped: the log's reader fell behind]",
    ]


def test_flush_writes_what_is_waiting() -> None:
    stream = Pipe()
    handler = BufferedStreamHandler(stream, flush_s=30)
    log = logger_to(handler)
    log.info("a")
    log.info("b")
    handler.flush()  # logging.shutdown() does this at exit
    assert stream.getvalue() == "a\nb\n"
