"""One error envelope everywhere: {"error": "...", "error_type": "..."}; never a stack trace."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.types import EngineError

log = logging.getLogger(__name__)

# engine error kind -> (HTTP status, error_type)
ENGINE_STATUS = {
    "validation": (422, "validation"),
    "overloaded": (429, "overloaded"),
    "not_ready": (503, "not_ready"),
    "timeout": (504, "timeout"),
    "error": (500, "internal"),
}
HTTP_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "too_large",
    415: "unsupported_media_type",
    422: "validation",
    429: "overloaded",
    503: "not_ready",
    504: "timeout",
}
RETRY_AFTER_S = "1"
BODY_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's 400 detail when json.loads raises


class APIError(Exception):
    """An error raised by a route: status, message and error_type."""

    def __init__(self, status: int, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or HTTP_TYPES.get(status, "error")


def envelope(
    status: int, message: str, error_type: str, headers: dict[str, str] | None = None, openai: bool = False
) -> JSONResponse:
    """The error reply; on /v1/* routes in OpenAI's shape ({"error": {"message", "type", ...}})."""
    if status == 429:
        headers = {**(headers or {}), "Retry-After": RETRY_AFTER_S}
    if openai:
        body: dict[str, Any] = {"error": {"message": message, "type": error_type, "param": None, "code": status}}
    else:
        body = {"error": message, "error_type": error_type}
    return JSONResponse(body, status_code=status, headers=headers)


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def engine_error_status(exc: EngineError) -> tuple[int, str]:
    return ENGINE_STATUS.get(exc.kind, (500, "internal"))


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
        status, kind = engine_error_status(exc)
        return envelope(status, str(exc), kind, openai=_is_openai(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return envelope(422, describe_validation(list(exc.errors())), "validation", openai=_is_openai(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR:
            # a body the JSON parser gave up on (invalid UTF-8, nesting past the recursion limit)
            return envelope(422, "malformed JSON body", "validation", openai=_is_openai(request))
        kind = HTTP_TYPES.get(exc.status_code, "error")
        headers = dict(exc.headers) if exc.headers else None  # e.g. Allow on 405
        return envelope(exc.status_code, str(exc.detail), kind, headers=headers, openai=_is_openai(request))

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return envelope(500, "internal server error", "internal", openai=_is_openai(request))
