"""EngineClient: what the API layer may ask of the engine (vLLM's engine/protocol.py).

The routes and the service's lifecycle depend on this protocol, not on the Engine class: token
ids in, events and scores out, and nothing of HTTP. `Engine` (engine.py) is the one implementation.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Protocol

from app.decoding.predict import Scores
from app.engine.admission import NO_RESERVATION, Reservation
from app.engine.config import Health
from app.engine.types import EngineError, Event, GenerateJob, PredictJob


class EngineClient(Protocol):
    def generate(self, request: GenerateJob, reservation: Reservation = NO_RESERVATION) -> AsyncGenerator[Event, None]:
        """Events of one sequence; closing the iterator early cancels it. reservation: the
        queue place `enter` reserved for it at the door, which its queue entry replaces."""
        ...

    async def predict(self, requests: list[PredictJob], reservation: Reservation = NO_RESERVATION) -> list[Scores]:
        """Each request's next-k-token scores; requests may share forward passes. reservation:
        as for generate."""
        ...

    def stop(self, request: GenerateJob) -> None:
        """End a sequence as a success (a stop sequence matched); its stream is closed next."""
        ...

    def abort(self, request_id: str) -> None:
        """Cancel every sequence of a request (GenerateJob.request_id) at the next step boundary."""
        ...

    def speculates(self, request: GenerateJob) -> bool:
        """Whether this request's sequence will draft and verify."""
        ...

    def health(self) -> Health: ...

    def info(self) -> dict[str, Any]: ...

    # admission and lifecycle, used by the middleware and the server
    def enter(self) -> Reservation | None:
        """Reserve a queue place for a request whose body is about to be read (None: the queue is full)."""
        ...

    def turns_away(self) -> bool:
        """Whether enter() would return None now."""
        ...

    def places_free(self) -> int: ...

    def pending(self) -> int: ...

    async def drain(self, timeout: float) -> bool: ...

    def fail_all(self, error: EngineError) -> None: ...
