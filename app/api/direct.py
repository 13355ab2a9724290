"""Hot routes served past FastAPI's per-request layers, for a whole JSON body that validates.

Under /predict load the event loop's CPU per request is what holds the served pass under its
in-process speed (docs/benchmarks.md, benchmarks 34 and 66), and most of the app's part of it
was FastAPI's and Starlette's layers around the route (the error, telemetry and body-limit
middleware, the exit stacks, the router's matching, solving the dependencies, reading the body
as JSON and then validating it, re-validating the returned model), not the route's own code.

`DirectRoutes` sits where the door (RequestContext) hands requests to FastAPI. A POST to a
direct route with a JSON content type has its whole body read here and validated in one step
from its bytes (pydantic's JSON mode); if it validates, the route's own endpoint function is
called with it, as FastAPI would call it, and its model is written as JSON. Anything else goes
to FastAPI unchanged: another route or method, another content type, a body that does not
validate (the messages read so far are handed on, so the refusal is FastAPI's own reply), a
receive() that raised (handed on to raise again there). An exception from the endpoint gets
the app's own handler for its class, as FastAPI's exception middleware would give it. With
user middleware (CORS) the app does not use this at all: that middleware wraps FastAPI's stack,
and a request passed around it would miss it.

The OpenAPI schema, HEAD/405 answers and everything else about a direct route stay FastAPI's:
the route is declared there as before, and tests check that both paths give the same bytes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import Serving, get_serving, get_state


@dataclass(frozen=True)
class DirectRoute:
    """A POST route whose endpoint is `async def f(body, serving: ServingDep, request) -> model`."""

    path: str
    body: type[BaseModel]
    endpoint: Callable[[Any, Serving, Request], Awaitable[BaseModel]]


def json_media(headers: list[tuple[bytes, bytes]]) -> bool:
    """The request's Content-Type is JSON (application/json, or a +json type), as FastAPI reads a body."""
    for name, value in headers:
        if name == b"content-type":
            media = value.partition(b";")[0].strip().lower()
            return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))
    return False


class DirectRoutes:
    def __init__(self, app: ASGIApp, service: FastAPI, routes: list[DirectRoute]) -> None:
        self.app = app  # FastAPI's stack
        self.service = service  # for its exception handlers
        self.routes = {r.path: r for r in routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None or not json_media(scope["headers"]):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        try:
            while True:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request" or not message.get("more_body", False):
                    break
        except Exception as exc:  # the door's body limits (408, 413): FastAPI's stack meets them as before
            await self.app(scope, replay(messages, receive, exc), send)
            return
        if messages[-1]["type"] != "http.request":  # the client left mid-body
            await self.app(scope, replay(messages, receive), send)
            return
        body = b"".join(m.get("body", b"") for m in messages)
        try:
            parsed = route.body.model_validate_json(body)
        except ValidationError:
            await self.app(scope, replay(messages, receive), send)
            return
        request = Request(scope, receive, send)  # receive() now waits for a disconnect, as in FastAPI
        try:
            serving = await get_serving(await get_state(request), request)
            result = await route.endpoint(parsed, serving, request)
            response = Response(result.model_dump_json(), media_type="application/json")
        except Exception as exc:
            handler = self.handler(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)

    def handler(self, exc: Exception) -> Any:
        """The app's handler for the exception's class or its nearest base, as Starlette looks it up."""
        handlers = self.service.exception_handlers
        return next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)


def replay(messages: list[Message], receive: Receive, error: Exception | None = None) -> Receive:
    """receive() that gives back the messages already read, then raises what the read raised, or reads on."""
    queue = list(messages)

    async def again() -> Message:
        if queue:
            return queue.pop(0)
        if error is not None:
            raise error
        return await receive()

    return again
