"""The exception handlers: every error leaves in the shape of the route's dialect.

Domain code raises `auraserve.errors.*`; the dialect the route declared (`api.deps`) turns it
into a response (`api.dialect.Dialect.render` and its overrides). Errors raised before any
route matched (404 and 405 of unknown paths) have no dialect and use the default one (queue);
the OpenAI dialect claims its own prefix with a route of its own, so the SDKs still get their
shape there. The body limit (`api.app.BodyLimit`) answers before routing, in the default shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from auraserve.api.deps import dialect_of
from auraserve.api.dialect import Dialect, Problem
from auraserve.errors import AuraserveError

log = logging.getLogger(__name__)

HTTP_TITLES = {
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
NOT_FOUND = "The requested URL does not exist"
METHOD_NOT_ALLOWED = "The requested HTTP method is not allowed"


def http_problem(status: int, detail: str | None, headers: dict[str, str]) -> Problem:
    message = detail or HTTP_TITLES.get(status, "Error")
    if status == 404 and detail in (None, "Not Found"):
        message = NOT_FOUND
    if status == 405:
        message = METHOD_NOT_ALLOWED
    return Problem(status, HTTP_TITLES.get(status, "Error"), message, headers=headers)


def install(app: FastAPI, default: Dialect) -> None:
    """Register the handlers; `default` renders errors of requests that matched no route."""

    def dialect(request: Request) -> Dialect:
        return dialect_of(request.scope) or default

    @app.exception_handler(AuraserveError)
    async def _domain(request: Request, exc: AuraserveError) -> JSONResponse:
        if exc.status >= 500 and exc.status != 504:  # 504 is a sync wait timing out
            log.error("server fault on %s: %s", request.url.path, exc.message)
        chosen = dialect(request)
        return chosen.render(chosen.problem(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail) if exc.detail else None
        problem = http_problem(exc.status_code, detail, dict(exc.headers or {}))
        return dialect(request).render(problem)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid"}
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        field = ".".join(loc) or None
        problem = Problem(
            400, "Invalid parameter", f"{field or 'request'}: {err['msg']}", field=field
        )
        return dialect(request).render(problem)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        problem = Problem(500, "Internal Server Error", "Server had some issue with processing")
        return dialect(request).render(problem)
