"""Pure ASGI middleware: request ids, the API key, body-size limit, load shedding, per-route metrics.

It runs outermost, in front of FastAPI's own middleware (see app.main.ServiceApp): a refused
request then costs the door check and one write, not a pass through every layer. The order of
the checks is the point: the key is checked from the headers before anything is held, so a
client without it costs O(1) and can never take a queue place from one that has it.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import re
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from app.api.docs import ASSETS_PATH
from app.api.errors import envelope, failure_reason
from app.engine.admission import NO_RESERVATION, Reservation
from app.logs import request_id_var
from app.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RESERVATION = "mtp_reservation"  # the door's queue place, in the request's state (request.state)
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_ID_PREFIX = secrets.token_hex(8)  # random per process; a counter makes each id unique after it
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"  # 32 hex digits, like a uuid4 hex


def request_id(headers: dict[bytes, bytes]) -> str:
    """The client's X-Request-Id where it is a safe token, else a new id."""
    given = headers.get(b"x-request-id", b"").decode("latin-1")
    return given if _SAFE_ID.match(given) else new_request_id()


QUEUE_FULL = "queue full; retry later"
CLOSE = (b"connection", b"close")  # a reply's header: the server closes the connection after it
# The routes that queue work for the engine ("/" is TGI's compat route for /generate):
# refused at the door when the queue is full. tests/api/test_system.py checks that every POST
# route but /tokenize is here.
SHED_PATHS = frozenset({"/", "/predict", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions"})
KEYED_PATHS = SHED_PATHS | {"/tokenize"}  # and every /v1/ path


def route_label(scope: Scope, path: str) -> str:
    """The route label of a request's metrics: the matched route's template (an inference route's
    path also when refused before routing), /openapi.json, the docs assets as one label, else
    "unmatched" (a label per unknown URL would grow without bound)."""
    route = scope.get("route")  # set for FastAPI routes only, not for /openapi.json or a mount
    if route is not None:
        return str(route.path)
    if path in SHED_PATHS or path == "/openapi.json":
        return path
    return ASSETS_PATH if path.startswith(ASSETS_PATH + "/") else "unmatched"


def authorized(headers: dict[bytes, bytes], key: str) -> bool:
    """A bearer token equal to the key, compared in constant time."""
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode())


class RequestContext:
    """X-Request-Id, the API key, the door (queue places, 429), the body limits (413, 408) and metrics.

    A place taken at the door is held while the body arrives (within body_timeout_s) and until
    the request reaches the engine's queue. The last `bodies_per_client` free places are kept
    for clients (by address) holding fewer than that many places whose body is still
    arriving: a client that stalls its bodies can take the rest of the queue but never all of
    it, while a client sending many requests at once is not limited while there is room.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int,
        body_timeout_s: float = 10.0,
        enter: Callable[[], Reservation | None] | None = None,
        api_key: str | None = None,
        bodies_per_client: int | None = None,
        places_free: Callable[[], int] | None = None,
        turns_away: Callable[[], bool] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes
        self.body_timeout = body_timeout_s
        self.enter = enter  # holds a queue place for an inference request, None when full
        self.api_key = api_key
        self.bodies_per_client = bodies_per_client
        self.places_free = places_free  # queue places not taken (None: no engine yet)
        self.turns_away = turns_away  # True when enter() would refuse now (a full queue)
        self._arriving: Counter[str] = Counter()  # client address -> places held by bodies still arriving
        self._per_route: dict[tuple[str, int], tuple[Any, Any]] = {}  # labelled metric children

    def _observe(self, path: str, status: int, seconds: float) -> None:
        children = self._per_route.get((path, status))
        if children is None:
            children = (self.metrics.requests.labels(path, str(status)), self.metrics.request_duration.labels(path))
            self._per_route[(path, status)] = children
        children[0].inc()
        children[1].observe(seconds)
        reason = failure_reason(status)
        if reason is not None:
            self.metrics.failures.labels(reason).inc()

    def _needs_key(self, method: str, path: str) -> bool:
        if self.api_key is None or method == "OPTIONS":  # CORS preflights carry no credentials
            return False
        return path in KEYED_PATHS or path.startswith("/v1/")

    def _refusal(self, method: str, path: str, headers: dict[bytes, bytes]) -> tuple[int, str, str]:
        """(status, message, error_type) when the key, the declared body length or the body's
        content coding refuses the request, else (0, ...)."""
        if self._needs_key(method, path) and not authorized(headers, self.api_key or ""):
            return 401, "missing or invalid API key", "unauthorized"
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return 413, f"request body larger than {self.max_body} bytes", "too_large"
        coding = headers.get(b"content-encoding", b"identity").strip().lower()
        if coding not in (b"identity", b""):  # a compressed body would be read as the JSON it is not
            shown = coding.decode("latin-1")[:40]
            return (
                415,
                f"Content-Encoding {shown!r} is not supported: send the body uncompressed",
                "unsupported_media_type",
            )
        return 0, "", ""

    def _stalled_bodies(self, path: str, client: str) -> bool:
        """This client already holds its share of places with bodies still arriving, and the
        queue is down to the places kept for the others."""
        cap = self.bodies_per_client
        return (
            cap is not None
            and self.places_free is not None
            and path in SHED_PATHS
            and self._arriving[client] >= cap
            and self.places_free() <= cap
        )

    def refuse_at_head(self, method: str, path: str, headers: dict[bytes, bytes]) -> JSONResponse | None:
        """The reply to a request that the door refuses from its head alone, or None to let it in.

        `mtp serve`'s HTTP protocol asks this as soon as a request head is parsed, before uvicorn
        makes a request cycle and a task for it, and writes the reply itself (app/serve.py): in
        a burst against a full queue most requests end here, and each costs the event loop this
        check and one socket write. The checks are __call__'s first ones, in its order: the key
        (401), the declared body length (413), a full queue for an inference POST (429). The
        per-client share of places still sending a body is left to __call__: it goes by the
        client's address, which a trusted proxy's X-Forwarded-For may still change."""
        status, message, error_type = self._refusal(method, path, headers)
        if not status and method == "POST" and path in SHED_PATHS and self.turns_away is not None and self.turns_away():
            status, message, error_type = 429, QUEUE_FULL, "overloaded"
        if not status:
            return None
        return envelope(status, message, error_type, openai=path.startswith("/v1/"))

    def refused_at_head(self, path: str, status: int, seconds: float) -> None:
        """Count a reply made by refuse_at_head, as __call__ counts its own."""
        self._observe(route_label({}, path), status, seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = request_id(headers)
        token = request_id_var.set(rid)
        rid_header = (b"x-request-id", rid.encode())
        start = time.perf_counter()
        status_box = [500]
        # Set when the body stopped short (408: it did not all arrive in time; 413: it outgrew
        # the limit): the reply closes the connection. Kept open, the parser would still wait
        # for the rest of the body, and read the client's next request as that.
        cut_short = False

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], rid_header, *([CLOSE] if cut_short else [])]
            await send(message)

        async def refuse(status: int, message: str, error_type: str) -> None:
            reply = envelope(status, message, error_type, openai=path.startswith("/v1/"))
            await reply(scope, receive, send_wrapped)

        path = scope.get("path", "")
        client = (scope.get("client") or ("-", 0))[0]
        ticket: Reservation | None = NO_RESERVATION
        arriving = False
        try:
            status, message, error_type = self._refusal(scope.get("method", ""), path, headers)
            if not status and self._stalled_bodies(path, client):
                cap = self.bodies_per_client
                status, error_type = 429, "overloaded"
                message = f"queue nearly full, and {cap} requests from this client are still sending their body"
            if status:
                await refuse(status, message, error_type)
                return
            if self.enter is not None and scope.get("method") == "POST" and path in SHED_PATHS:
                # Shed load at the door: a full queue (counting the places held by requests
                # already past the door) answers 429 before the body is read, parsed or
                # tokenized, so refusals stay fast however hard the burst.
                ticket = self.enter()
                if ticket is None:
                    await refuse(429, QUEUE_FULL, "overloaded")
                    return
                scope.setdefault("state", {})[RESERVATION] = ticket  # the route hands it to the engine
                arriving = ticket is not NO_RESERVATION
                self._arriving[client] += arriving
            received = 0
            body_done = False
            body_deadline = asyncio.get_running_loop().time() + self.body_timeout

            async def receive_limited() -> Message:
                nonlocal received, body_done, arriving, cut_short
                if body_done:  # later receive() calls wait for a disconnect (streams): no deadline
                    return await receive()
                # The whole body must arrive in time: a slow-drip client cannot hold a worker slot.
                # asyncio.timeout, not wait_for: no task per receive, so a body that has already
                # arrived is read without suspending (its place is not "arriving" for a moment).
                try:
                    async with asyncio.timeout_at(body_deadline):
                        message = await receive()
                except TimeoutError:
                    cut_short = True
                    raise BodyTimeout(self.body_timeout) from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        cut_short = True
                        raise BodyTooLarge(self.max_body)
                    body_done = not message.get("more_body", False)
                if (body_done or message["type"] == "http.disconnect") and arriving:
                    self._arriving[client] -= 1
                    arriving = False
                return message

            try:
                await self.app(scope, receive_limited, send_wrapped)
            except BodyTooLarge:
                await refuse(413, f"request body larger than {self.max_body} bytes", "too_large")
        finally:
            if arriving:
                self._arriving[client] -= 1
            if self._arriving[client] <= 0:
                del self._arriving[client]
            if ticket is not None:
                ticket.release()  # a request that ended before reaching the queue frees its place
            self._observe(route_label(scope, path), status_box[0], time.perf_counter() - start)
            request_id_var.reset(token)


class BodyTimeout(StarletteHTTPException):
    def __init__(self, limit: float) -> None:
        super().__init__(408, f"request body not received within {limit:g} s")


class BodyTooLarge(StarletteHTTPException):
    """Raised from receive() mid-body; FastAPI re-raises HTTPExceptions, so it becomes a 413 envelope."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")
