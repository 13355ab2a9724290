"""Typed dependencies: the service state the lifespan built, handed to routes.

They are `async def` although they never await: FastAPI runs a plain `def` dependency in a
thread pool, a thread hop per dependency per request that costs more than the check itself.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from tokenizers import Encoding

from app.api.errors import APIError
from app.api.middleware import RESERVATION
from app.config import Settings
from app.engine.admission import NO_RESERVATION, Reservation
from app.engine.client import EngineClient
from app.metrics import Metrics
from app.model.config import ModelConfig
from app.model.tokenizer import Tokenizer


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    engine: EngineClient | None = None
    tokenizer: Tokenizer | None = None
    model_config: ModelConfig | None = None
    model_id: str = ""
    ready: bool = False
    draining: bool = False

    @property
    def max_input_tokens(self) -> int:
        assert self.model_config is not None
        cap = self.settings.max_input_tokens or self.model_config.max_seq_len
        return min(cap, self.model_config.max_seq_len)


async def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


OFF_LOOP_CHARS = 2048  # longer inputs are tokenized on a thread (the tokenizer's batch call there lets the GIL go)
# One thread for it: long inputs queue behind each other instead of taking more cores (and
# malloc arenas) from the inference thread; torch never runs there.
TOKENIZE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtp-tokenize")


@dataclass
class Serving:
    """What an inference route needs once the service is ready."""

    state: ServiceState
    engine: EngineClient
    tokenizer: Tokenizer
    model_config: ModelConfig
    settings: Settings
    reservation: Reservation = NO_RESERVATION  # the queue place the door reserved for this request

    @property
    def max_inputs(self) -> int:
        """The most inputs (or sequences: prompts times choices) one request may hold: the
        setting, and never more than the queue holds (more could never be admitted, and would
        be refused as a retryable 429 however idle the server)."""
        return min(self.settings.max_inputs_per_request, self.settings.max_queue_size)

    async def encodings(self, texts: list[str], field: str) -> list[Encoding]:
        """Tokenize texts of at most max_input_chars each (422 naming the field), off the event loop when long."""
        cap = self.settings.max_input_chars
        for text in texts:
            if len(text) > cap:
                raise APIError(422, f"{field} has {len(text)} characters; the limit is {cap}")
        hf = self.tokenizer.hf
        if sum(map(len, texts)) > OFF_LOOP_CHARS:
            run = functools.partial(hf.encode_batch, texts, add_special_tokens=False)
            return await asyncio.get_running_loop().run_in_executor(TOKENIZE_THREAD, run)
        # On the loop one text at a time: encode() keeps the GIL. encode_batch() lets it go, and
        # the loop must then win it back from the inference thread, which holds it between the
        # ops of an eager pass: under /predict load that wait was most of the call's time.
        return [hf.encode(t, add_special_tokens=False) for t in texts]

    async def encode(self, texts: list[str], field: str) -> list[list[int]]:
        return [list(e.ids) for e in await self.encodings(texts, field)]


async def get_serving(state: StateDep, request: Request) -> Serving:
    if state.draining:
        raise APIError(503, "the server is shutting down", "not_ready")
    if not state.ready or state.engine is None or state.tokenizer is None or state.model_config is None:
        raise APIError(503, "the model is not ready yet", "not_ready")
    reservation = getattr(request.state, RESERVATION, NO_RESERVATION)
    return Serving(state, state.engine, state.tokenizer, state.model_config, state.settings, reservation)


ServingDep = Annotated[Serving, Depends(get_serving)]
T = TypeVar("T")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await work, cancelling it when the client goes away first (the engine then drops its
    sequences at the next step). Raises APIError(499): the reply goes nowhere, the log says why.

    The work runs in the calling task, and one watcher task waits for the disconnect and then
    cancels the caller: a task of its own for the work and asyncio.wait's future beside the
    watcher were two more objects with their callbacks per request for the event loop to make
    and run, under /predict load a few per cent of its time. A watcher that fails (the
    connection broken some other way) counts as the client gone, as before."""
    caller = asyncio.current_task()
    if caller is None:  # not in a task: nothing the watcher could cancel
        return await work
    gone = False

    async def disconnected() -> None:
        nonlocal gone
        try:
            while (await request.receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a broken connection is a client gone
            pass
        gone = True
        caller.cancel()

    watcher = asyncio.ensure_future(disconnected())
    try:
        return await work
    except asyncio.CancelledError:
        if gone and caller.uncancel() == 0:  # the watcher's cancel, and nobody else's
            raise APIError(499, "the client disconnected", "cancelled") from None
        raise
    finally:
        watcher.cancel()
