"""`mtp serve`: uvicorn with a graceful drain on SIGTERM/SIGINT.

On the first signal the service turns /ready to 503 and answers new work with 503, while
in-flight requests (streams included) finish, up to the drain timeout; then uvicorn shuts
down and the process exits 0. A second signal exits at once, with status 130.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import socket
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.api.deps import ServiceState
from app.config import Settings
from app.logs import setup_logging
from app.main import create_app

log = logging.getLogger(__name__)
SWITCH_INTERVAL_S = 0.0005
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
TRIM_THRESHOLD = 256 * 2**20


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
        if self._draining or self._loop is None or not self.started:
            super().handle_exit(sig, frame)  # second signal, or not serving yet: exit now
            return
        self._draining = True
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()) if self._loop else None)

    async def _drain(self) -> None:
        state: ServiceState = self.app.state.service
        state.draining = True
        state.metrics.ready.set(0)
        log.info("draining: /ready is 503, new work gets 503; waiting up to %.0fs", self.drain_timeout_s)
        finished = True
        if state.engine is not None:
            finished = await state.engine.drain(self.drain_timeout_s)
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


def serve(settings: Settings) -> int:
    setup_logging(settings.log_level, settings.log_json)
    fix_mmap_threshold(settings.malloc_mmap_threshold)
    # The inference thread holds the GIL between torch ops; a short switch interval lets the
    # event loop get it back quickly, so /health, /metrics and 429s stay fast at full load.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 5,
        timeout_keep_alive=5,
    )
    server = DrainingServer(config, app, settings.drain_timeout_s)
    log.info("listening on http://%s:%d (API docs at /docs)", settings.host, settings.port)
    try:
        server.run()
    except KeyboardInterrupt:  # a second signal during the drain: stop now, as asked
        log.warning("second signal: exiting without waiting for the drain")
        return 130
    return 0 if server.started else 1
