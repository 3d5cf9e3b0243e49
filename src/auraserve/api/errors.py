"""The exception handlers: every error leaves in the shape of the route's dialect.

Domain code raises `auraserve.errors.*`; the dialect the route declared (`api.deps`) turns it
into a response (`api.dialect.Dialect.render` and its overrides). Errors raised before any
route matched (404 and 405 of unknown paths) have no dialect: the dialect that claims the
path's prefix renders them (OpenAI Images claims `/v1/`, so the SDKs get their shape for any
path below their `base_url`), else the default one (the Queue API's). The body limit
(`api.app.BodyLimit`) answers before routing and chooses the same way (`dialect_for_path`).

A database that cannot be reached is a 503 with `Retry-After` (`StoreUnavailable`), never a
500, whether the store already translated the failure (`store.db.Store.read`/`write`) or a
raw SQLAlchemy error escaped: `Store.is_unavailable` (its driver) decides. Each failure is
logged once, on one line, at error level.

Unexpected exceptions are caught by `ServerErrors`, a middleware inside Starlette's own
`ServerErrorMiddleware`: an `exception_handler(Exception)` would be called by that middleware,
which renders the response and then re-raises so that the server logs the traceback as well,
hence every traceback twice. `ServerErrors` logs it once and does not re-raise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auraserve.api.deps import dialect_of
from auraserve.api.dialect import Dialect, Problem
from auraserve.errors import AuraserveError, StoreUnavailable
from auraserve.observability.logs import describe
from auraserve.observability.metrics import STORE_UNAVAILABLE

log = logging.getLogger(__name__)

# Whether an exception says the store cannot be used right now (`Store.is_unavailable`).
Unavailable = Callable[[BaseException], bool]

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
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def dialect_for_path(
    path: str, default: Dialect, prefixes: Mapping[str, Dialect] | None = None
) -> Dialect:
    """The dialect for an error of a request no route claimed: by path prefix, else default."""
    for prefix, dialect in (prefixes or {}).items():
        if path.startswith(prefix):
            return dialect
    return default


def install(
    app: FastAPI,
    default: Dialect,
    prefixes: Mapping[str, Dialect] | None = None,
    *,
    is_unavailable: Unavailable,
) -> None:
    """Register the handlers; errors of requests that matched no route are rendered by the
    dialect of `prefixes` their path starts with, else by `default`."""

    def dialect(request: Request) -> Dialect:
        return _dialect(request.scope, default, prefixes)

    @app.exception_handler(AuraserveError)
    async def _domain(request: Request, exc: AuraserveError) -> JSONResponse:
        if isinstance(exc, StoreUnavailable):
            cause = exc.__cause__
            _log_unavailable(request.scope, describe(cause) if cause is not None else exc.message)
        elif exc.status >= 500 and exc.status != 504:  # 504 is a sync wait timing out
            log.error("server fault on %s: %s", request.url.path, exc.message)
        chosen = dialect(request)
        return chosen.render(chosen.problem(exc))

    async def _database(request: Request, exc: Exception) -> JSONResponse:
        if not is_unavailable(exc):
            raise exc  # a wrong statement is a bug: ServerErrors logs it and answers 500
        unavailable = StoreUnavailable()
        unavailable.__cause__ = exc
        return await _domain(request, unavailable)

    # Raw SQLAlchemy errors from code that used a connection outside Store.read/write.
    app.add_exception_handler(DBAPIError, _database)
    app.add_exception_handler(PoolTimeout, _database)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status, detail = exc.status_code, str(exc.detail) if exc.detail else None
        title = HTTP_TITLES.get(status, "Error")
        message = detail or title
        if status == 404 and detail in (None, "Not Found"):
            message = "The requested URL does not exist"
        if status == 405:
            message = "The requested HTTP method is not allowed"
        problem = Problem(status, title, message, headers=dict(exc.headers or {}))
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

    app.add_middleware(
        ServerErrors, default=default, prefixes=prefixes, is_unavailable=is_unavailable
    )


def _log_unavailable(scope: Scope, cause: str) -> None:
    STORE_UNAVAILABLE.labels("api").inc()
    log.error("database unavailable on %s %s: %s", scope["method"], scope.get("path", ""), cause)


def _dialect(scope: Scope, default: Dialect, prefixes: Mapping[str, Dialect] | None) -> Dialect:
    return dialect_of(scope) or dialect_for_path(scope.get("path", ""), default, prefixes)


class ServerErrors:
    """The last resort for an exception no handler took: log it once (with its traceback) and
    answer the route's dialect's 500, without re-raising (see the module docstring). An
    exception after the response started can only be logged; the connection is then closed
    by the server."""

    def __init__(
        self,
        app: ASGIApp,
        default: Dialect,
        prefixes: Mapping[str, Dialect] | None = None,
        *,
        is_unavailable: Unavailable,
    ) -> None:
        self.app = app
        self.is_unavailable = is_unavailable
        self.default = default
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            # The client went away mid-body (or the server closed a stalled body): nobody is
            # left to answer, and it is not a server fault worth a traceback.
            log.debug("client disconnected during %s %s", scope["method"], scope.get("path"))
        except Exception as exc:
            dialect = _dialect(scope, self.default, self.prefixes)
            if self.is_unavailable(exc):  # e.g. raised while a response was streaming
                _log_unavailable(scope, describe(exc))
                problem = dialect.problem(StoreUnavailable())
            else:
                log.exception("unhandled error on %s %s", scope["method"], scope.get("path"))
                problem = Problem(
                    500, "Internal Server Error", "Server had some issue with processing"
                )
            if started:
                return
            await dialect.render(problem)(scope, receive, send)
