"""One error envelope everywhere: {"error": "...", "error_type": "..."}; never a stack trace."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.types import EngineError
from app.metrics import FAILURE_REASONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorKind:
    """One kind of failure: its HTTP status, its error_type in replies and SSE error events, and
    its mtp_request_failures_total label (None: not a failure of the request, or counted by the
    engine, as cancellations are). error_type is TGI's name where TGI has the kind (its
    InferError::error_type, which huggingface_hub and text-generation turn into their exception
    classes); openai_type, where given, is the type /v1/* sends instead."""

    status: int
    error_type: str
    reason: str | None
    openai_type: str | None = None


# The one table of failures, keyed by the engine's EngineError.kind where the engine raises them.
# The first kind of a status is that status's default (BY_STATUS).
KINDS: dict[str, ErrorKind] = {
    "validation": ErrorKind(422, "validation", "validation"),
    "overloaded": ErrorKind(429, "overloaded", "overloaded"),
    "not_ready": ErrorKind(503, "not_ready", "not_ready"),
    "timeout": ErrorKind(504, "timeout", "timeout"),
    "internal": ErrorKind(500, "internal", "error"),  # a fault outside the model's passes (TGI has no name)
    "error": ErrorKind(500, "generation", "error", "internal"),  # a forward pass failed (TGI: 424 there)
    "incomplete_generation": ErrorKind(500, "incomplete_generation", "error", "internal"),  # no final result
    "unauthorized": ErrorKind(401, "unauthorized", "unauthorized"),
    "body_timeout": ErrorKind(408, "timeout", "timeout"),
    "too_large": ErrorKind(413, "too_large", "too_large"),
    "head_too_large": ErrorKind(431, "too_large", "too_large"),  # answered by mtp serve's protocol (app/serve.py)
    "cancelled": ErrorKind(499, "cancelled", None),  # the engine counts the cancellation
    "bad_request": ErrorKind(400, "bad_request", "validation"),  # /v1 answers 400 where the rest answers 422
    "not_found": ErrorKind(404, "not_found", None),
    "method_not_allowed": ErrorKind(405, "method_not_allowed", None),
    "unsupported_media_type": ErrorKind(415, "unsupported_media_type", None),
}
BY_STATUS = {kind.status: kind for kind in reversed(KINDS.values())}
OPENAI_TYPES = {kind.error_type: kind.openai_type for kind in KINDS.values() if kind.openai_type is not None}
assert {kind.reason for kind in KINDS.values()} - {None} <= set(FAILURE_REASONS), "a reason the metrics do not expose"
RETRY_AFTER_S = "1"
BODY_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's 400 detail when json.loads raises


def failure_reason(status: int) -> str | None:
    kind = BY_STATUS.get(status)
    return kind.reason if kind is not None else None


class APIError(Exception):
    """An error raised by a route: status, message and error_type (the table's, unless given)."""

    def __init__(self, status: int, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        kind = BY_STATUS.get(status)
        self.error_type = error_type or (kind.error_type if kind is not None else "error")

    @classmethod
    def from_engine(cls, exc: EngineError) -> APIError:
        kind = KINDS.get(exc.kind, KINDS["error"])
        return cls(kind.status, str(exc), kind.error_type)


def envelope(
    status: int,
    message: str,
    error_type: str,
    headers: dict[str, str] | None = None,
    openai: bool = False,
    param: str | None = None,
) -> JSONResponse:
    """The error reply; on /v1/* routes in OpenAI's shape ({"error": {"message", "type", ...}}),
    where a request the server cannot take as it is (422 elsewhere) is 400 invalid_request_error,
    as OpenAI and vLLM answer it."""
    if status == 429:
        headers = {**(headers or {}), "Retry-After": RETRY_AFTER_S}
    if openai and status == 422:
        status, error_type = 400, "invalid_request_error"
    return JSONResponse(error_body(message, error_type, openai, status, param), status_code=status, headers=headers)


def error_body(
    message: str, error_type: str, openai: bool, status: int | None = None, param: str | None = None
) -> dict[str, Any]:
    """The error envelope of an API family: TGI's {"error", "error_type"} or OpenAI's {"error": {...}}."""
    if openai:
        kind = OPENAI_TYPES.get(error_type, error_type)
        return {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return {"error": message, "error_type": error_type}


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def describe_validation(errors: list[Any]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            return "malformed JSON body"
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return envelope(exc.status, exc.message, exc.error_type, openai=_is_openai(request))

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        err = APIError.from_engine(exc)
        return envelope(err.status, err.message, err.error_type, openai=_is_openai(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        loc = [str(p) for p in errors[0].get("loc", ()) if p != "body"] if errors else []
        return envelope(
            422, describe_validation(errors), "validation", openai=_is_openai(request), param=".".join(loc) or None
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR:
            # a body the JSON parser gave up on (invalid UTF-8, nesting past the recursion limit)
            return envelope(422, "malformed JSON body", "validation", openai=_is_openai(request))
        known = BY_STATUS.get(exc.status_code)
        kind = known.error_type if known is not None else "error"
        headers = dict(exc.headers) if exc.headers else None  # e.g. Allow on 405
        return envelope(exc.status_code, str(exc.detail), kind, headers=headers, openai=_is_openai(request))

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return envelope(500, "internal server error", "internal", openai=_is_openai(request))
