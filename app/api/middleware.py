"""Pure ASGI middleware: request ids, body-size limit, load shedding, per-route request metrics.

It runs outermost, in front of FastAPI's own middleware (see app.main.ServiceApp): a refused
request then costs the door check and one write, not a pass through every layer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.engine import NO_TICKET, DoorTicket, door_ticket
from app.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ID_PREFIX = secrets.token_hex(8)  # random per process; a counter makes each id unique after it
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"  # 32 hex digits, like a uuid4 hex


SHED_PATHS = frozenset({"/predict", "/generate", "/generate_stream", "/v1/completions"})

# HTTP status -> failure reason in mtp_request_failures_total
FAILURE_REASON = {
    401: "unauthorized",
    408: "timeout",
    413: "too_large",
    422: "validation",
    429: "overloaded",
    500: "error",
    503: "not_ready",
    504: "timeout",
}


_REFUSAL = "queue full; retry later"
_REFUSAL_BODY = json.dumps({"error": _REFUSAL, "error_type": "overloaded"}).encode()
_REFUSAL_BODY_OPENAI = json.dumps({"error": {"message": _REFUSAL, "type": "overloaded"}}).encode()


async def _send_json(send: Send, status: int, body: dict[str, Any] | bytes, headers: list[tuple[bytes, bytes]]) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": data})


class RequestContext:
    """X-Request-Id (accepted when well-formed, else generated), body limit (413) and metrics."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int,
        body_timeout_s: float = 10.0,
        enter: Callable[[], DoorTicket | None] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.body_timeout = body_timeout_s
        self.enter = enter  # holds a queue place for an inference request, None when full
        self._per_route: dict[tuple[str, int], tuple[Any, Any]] = {}  # labelled metric children

    def _observe(self, path: str, status: int, seconds: float) -> None:
        children = self._per_route.get((path, status))
        if children is None:
            children = (self.metrics.requests.labels(path, str(status)), self.metrics.request_duration.labels(path))
            self._per_route[(path, status)] = children
        children[0].inc()
        children[1].observe(seconds)
        reason = FAILURE_REASON.get(status)
        if reason is not None:
            self.metrics.failures.labels(reason).inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SAFE_ID.match(given) else new_request_id()
        token = request_id_var.set(rid)
        rid_header = (b"x-request-id", rid.encode())
        start = time.perf_counter()
        status_box = [500]

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], rid_header]
            await send(message)

        path = scope.get("path", "")
        ticket: DoorTicket | None = NO_TICKET
        if self.enter is not None and scope.get("method") == "POST" and path in SHED_PATHS:
            ticket = self.enter()
        ticket_token = door_ticket.set(ticket or NO_TICKET)
        try:
            if ticket is None:
                # Shed load at the door: a full queue (counting the places held by requests
                # already past the door) answers 429 before the body is read, parsed or
                # tokenized, so refusals stay fast however hard the burst.
                status_box[0] = 429
                body = _REFUSAL_BODY_OPENAI if path.startswith("/v1/") else _REFUSAL_BODY
                await _send_json(send, 429, body, [rid_header, (b"retry-after", b"1")])
                return
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                status_box[0] = 413
                msg = f"request body larger than {self.max_body} bytes"
                await _send_json(send, 413, {"error": msg, "error_type": "too_large"}, [rid_header])
                return
            received = 0
            body_done = False
            body_deadline = time.monotonic() + self.body_timeout

            async def receive_limited() -> Message:
                nonlocal received, body_done
                if body_done:  # later receive() calls wait for a disconnect (streams): no deadline
                    return await receive()
                left = body_deadline - time.monotonic()
                try:  # the whole body must arrive in time: a slow-drip client cannot hold a worker slot
                    message = await asyncio.wait_for(receive(), timeout=max(left, 0.001))
                except TimeoutError:
                    raise BodyTimeout(self.body_timeout) from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise BodyTooLarge(self.max_body)
                    body_done = not message.get("more_body", False)
                return message

            try:
                await self.app(scope, receive_limited, send_wrapped)
            except BodyTooLarge:
                status_box[0] = 413
                msg = f"request body larger than {self.max_body} bytes"
                await _send_json(send, 413, {"error": msg, "error_type": "too_large"}, [rid_header])
        finally:
            if ticket is not None:
                ticket.release()  # a request that ended before reaching the queue frees its place
            door_ticket.reset(ticket_token)
            route = scope.get("route")
            path = getattr(route, "path", None) or (path if path in SHED_PATHS else "unmatched")
            self._observe(path, status_box[0], time.perf_counter() - start)
            request_id_var.reset(token)


class BodyTimeout(StarletteHTTPException):
    def __init__(self, limit: float) -> None:
        super().__init__(408, f"request body not received within {limit:g} s")


class BodyTooLarge(StarletteHTTPException):
    """Raised from receive() mid-body; FastAPI re-raises HTTPExceptions, so it becomes a 413 envelope."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")
