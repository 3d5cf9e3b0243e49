"""Rendering errors in each dialect's shape. Domain code raises `auraserve.errors.*`; the
route's dialect (set on `request.state.dialect`) decides the body:

- queue (seed 002) and the default: `{"error": title, "message": text}` (+ `field`)
- sync (seed 000): same body; its own status codes are applied by the dialect (406 for credits)
- openai: `{"error": {"message", "type", "param", "code"}}`
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from auraserve.errors import AuraserveError, InvalidParameter, QueueLimitReached

log = logging.getLogger(__name__)

_HTTP_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    409: "Conflict",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    504: "Gateway Timeout",
}
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    504: "timeout_error",
}


def use_dialect(name: str) -> Callable[[Request], Awaitable[None]]:
    """A router dependency that marks its routes' dialect for error rendering. It is async on
    purpose: FastAPI runs plain `def` dependencies in the thread pool, and that hand-off per
    request cost more than the whole status lookup (see docs/benchmarks.md)."""

    async def mark(request: Request) -> None:
        request.state.dialect = name

    return mark


def dialect_of(request: Request) -> str:
    dialect = getattr(request.state, "dialect", None)
    if dialect:
        return str(dialect)
    if request.url.path.startswith("/v1/images"):
        return "openai"
    return "queue"


def render(
    request: Request,
    status: int,
    title: str,
    message: str,
    *,
    field: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    dialect = dialect_of(request)
    if dialect == "openai":
        body: dict[str, Any] = {
            "error": {
                "message": message,
                "type": _OPENAI_TYPES.get(status, "invalid_request_error"),
                "param": field,
                "code": code,
            }
        }
    else:
        body = {"error": title, "message": message}
        if field is not None:
            body["field"] = field
        if extra:
            body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers)


def status_for(request: Request, exc: AuraserveError) -> int:
    # Seed 000 answers 406 where seed 002 answers 402 for the same condition.
    if exc.status_code == 402 and dialect_of(request) == "sync":
        return 406
    if exc.status_code == 402 and dialect_of(request) == "openai":
        return 429  # OpenAI reports exhausted quota as 429 insufficient_quota
    return exc.status_code


def install(app: FastAPI) -> None:
    @app.exception_handler(AuraserveError)
    async def _domain(request: Request, exc: AuraserveError) -> JSONResponse:
        headers: dict[str, str] = {}
        if isinstance(exc, QueueLimitReached):
            headers["Retry-After"] = str(exc.retry_after)
        extra = getattr(exc, "extra", None)
        if exc.status_code >= 500 and exc.status_code != 504:  # 504 is a sync wait timing out
            log.error("server fault on %s: %s", request.url.path, exc.message)
        field = exc.field if isinstance(exc, InvalidParameter) else None
        code = "insufficient_quota" if exc.status_code == 402 else None
        return render(
            request,
            status_for(request, exc),
            exc.title,
            exc.message,
            field=field,
            code=code,
            headers=headers | dict(getattr(exc, "headers", {}) or {}),
            extra=extra,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = str(exc.detail) if exc.detail else _HTTP_TITLES.get(status, "Error")
        if status == 404 and exc.detail in (None, "Not Found"):
            message = "The requested URL does not exist"
        if status == 405:
            message = "The requested HTTP method is not allowed"
        return render(
            request,
            status,
            _HTTP_TITLES.get(status, "Error"),
            message,
            headers=dict(exc.headers or {}),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid"}
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        field = ".".join(loc) or None
        return render(
            request, 400, "Invalid parameter", f"{field or 'request'}: {err['msg']}", field=field
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return render(
            request, 500, "Internal Server Error", "Server had some issue with processing"
        )
