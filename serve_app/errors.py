"""Every error the API returns has one shape: ``{"error": {"code": ..., "message": ...}}``.

Handlers are installed for our own :class:`ApiError`, for FastAPI's request validation,
for Starlette's HTTP errors (404, 405, ...) and, last, for anything unexpected (500), so a
client never has to parse a second format.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")

# Starlette raises plain HTTP errors for routing and framework failures; name them.
HTTP_STATUS_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}


RETRY_AFTER = {"Retry-After": "1"}
"""What a 503 tells the client: how long to wait before it sends again."""


class ApiError(Exception):
    """A request the API refuses: HTTP status, a short machine-readable code and a message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.code, self.message)


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def format_validation_errors(errors: list[dict], prefix: str = "") -> tuple[str, str]:
    """Pydantic/FastAPI error list -> (code, message naming each bad field)."""
    missing = any(e.get("type") == "missing" for e in errors)
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        where = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or "body")
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return ("missing_field" if missing else "invalid_field"), "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure through the one error shape."""

    async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "malformed_json", "request body is not valid JSON")
        code, message = format_validation_errors(errors)
        return error_response(422, code, message)

    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_STATUS_CODES.get(exc.status_code, "client_error" if exc.status_code < 500 else "server_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Only a bug gets here (client mistakes are ApiErrors): log it, tell the client nothing internal.
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "the server failed to handle this request; it has been logged")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
