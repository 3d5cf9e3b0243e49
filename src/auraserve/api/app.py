"""The FastAPI application: factory, lifespan, cross-cutting middleware, media and health.

The app never runs the model: it writes jobs and reads their status. In `serve` the same
process also runs one worker thread (the embedded default); the runtime owns both.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auraserve import __version__
from auraserve.api import account_routes, admin_routes, errors, operations, request_routes
from auraserve.api.dialect import Dialect
from auraserve.api.dialects import openai, queue, sync
from auraserve.api.fast_status import FastStatus
from auraserve.api.limits import Kind, LongLivedSlots, endpoint_is, hold_slot, method_is
from auraserve.api.media_route import media_origins, serve_media
from auraserve.api.openapi import TAGS, media_responses, tidy_document
from auraserve.api.ratelimit import RateLimiter
from auraserve.api.state import ApiState
from auraserve.api.submit_batching import SubmitBatcher
from auraserve.errors import PayloadTooLarge
from auraserve.runtime import Runtime
from auraserve.webhooks.outbox import Dispatcher

log = logging.getLogger(__name__)

# Who renders errors of requests no route claimed (unknown paths, wrong methods, bodies too
# large), by path prefix; anything else is the Queue API's.
ERROR_PREFIXES: Mapping[str, Dialect] = {openai.PREFIX: openai.OPENAI}


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413 before reading them (Content-Length), or as
    soon as a streamed body passes the limit. Pure ASGI, so it costs nothing per chunk."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        dialect: Dialect,
        prefixes: Mapping[str, Dialect] | None = None,
    ) -> None:
        self.app = app
        self.limit = limit
        # No route has been chosen yet, so no route's dialect is known: the path's prefix
        # decides (OpenAI Images' /v1/), else the default renders it.
        self.dialect = dialect
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunked = False
        for name, value in scope.get("headers", ()):
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            if name == b"content-length":
                # The HTTP server enforces the declared length, so the header is enough.
                try:
                    declared = int(value)
                except ValueError:
                    declared = self.limit + 1
                if declared > self.limit:
                    await self._reject(scope, send)
                    return
                await self.app(scope, receive, send)
                return
        if not chunked:  # neither a length nor chunked: HTTP/1.1 says there is no body
            await self.app(scope, receive, send)
            return
        # Chunked: buffer up to the limit, then replay to the app.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message]), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._reject(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body_message: Message = {
            "type": "http.request",
            "body": b"".join(chunks),
            "more_body": False,
        }
        await self.app(scope, _replay([body_message], receive), send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        dialect = errors.dialect_for_path(scope.get("path", ""), self.dialect, self.prefixes)
        problem = dialect.problem(PayloadTooLarge(f"request body exceeds {self.limit} bytes"))
        body = json.dumps(dialect.error_body(problem), separators=(",", ":")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": problem.status,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    pending = list(messages)

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive


def _document_presets(app: FastAPI, presets: list[str]) -> None:
    """Serve the document `api.openapi.tidy_document` corrects, naming the configured presets
    (the routes are declared once, before any configuration is known)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            with warnings.catch_warnings():
                # One route serves cancel's POST and PUT; tidy_document gives each its own id.
                warnings.filterwarnings("ignore", message="Duplicate Operation ID")
                app.openapi_schema = tidy_document(build(), presets)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(runtime: Runtime, *, owns_runtime: bool = False) -> FastAPI:
    """Build the app around an open runtime. With `owns_runtime`, shutdown closes it."""

    state = ApiState(runtime, SubmitBatcher(runtime), LongLivedSlots())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Hear other processes' job events (PostgreSQL NOTIFY): sync waiters, SSE streams and
        # the outbox wake on them. No-op on SQLite, and when a worker already started it.
        runtime.db.start_listener()
        # Every API process rescues jobs of dead workers and sweeps media, however it was
        # started (serve, an API child, an ASGI server of the operator's): idempotent.
        runtime.start_maintenance()
        state.limiter = limiter = RateLimiter(runtime.settings)
        state.outbox = outbox = Dispatcher(
            runtime.db, runtime.settings.webhooks, media_url=runtime.media.url
        )
        outbox.start()
        try:
            yield
        finally:
            await outbox.stop()
            await limiter.close()
            # The status reader's PostgreSQL pool lives on this loop (opened by the first poll).
            await runtime.db.aclose()
            state.outbox = state.limiter = None
            if owns_runtime:
                runtime.close()

    app = FastAPI(
        title="auraserve",
        version=__version__,
        description="Self-hosted AuraFlow text-to-image API: the Queue API (submit, then "
        "poll), the Sync API (the image in the response) and OpenAI Images.",
        lifespan=lifespan,
        openapi_tags=TAGS,
        # account_routes serves /docs and /redoc from the package instead of a CDN.
        docs_url=None,
        redoc_url=None,
    )
    state.attach(app)
    # Innermost of the app's middlewares: the status poll's fast path stands in front of the
    # router only, so the error handler, body limit, request id and metrics still apply.
    app.add_middleware(FastStatus, runtime=runtime, routes=queue.router.routes)
    errors.install(
        app, default=queue.QUEUE, prefixes=ERROR_PREFIXES, is_unavailable=runtime.db.is_unavailable
    )
    app.include_router(queue.router)
    app.include_router(
        request_routes.router,
        dependencies=[
            hold_slot(Kind.STREAM, queue.QUEUE, endpoint_is(request_routes.stream)),
        ],
    )
    app.include_router(
        sync.build_router(runtime.settings),
        dependencies=[hold_slot(Kind.SYNC_WAIT, sync.SYNC, method_is("POST"))],
    )
    app.include_router(
        openai.router,
        dependencies=[hold_slot(Kind.SYNC_WAIT, openai.OPENAI, endpoint_is(openai.generations))],
    )
    account_routes.install(app, media_origins(runtime.media))
    app.include_router(admin_routes.router)
    _document_presets(app, sorted(runtime.settings.presets))

    @app.get(
        "/media/{name}",
        tags=["media"],
        summary="An image, by the name in a status object's output",
        response_class=Response,
        responses=media_responses(queue.QUEUE.error_responses(404)),
    )
    async def media(name: str) -> Response:
        return await serve_media(runtime, name)

    @app.get("/health", tags=["operations"])
    async def health() -> JSONResponse:
        workers = [
            {
                "id": w.worker_id,
                "state": w.state.value,
                "jobs_done": w.jobs_done,
                "warmup_seconds": w.warmup_seconds,
            }
            for w in runtime.workers
        ]
        engine = runtime.engine
        return JSONResponse(
            {
                "status": "starting"
                if any(w.state.value == "starting" for w in runtime.workers)
                else "ok",
                "version": __version__,
                "model": engine.description if engine else None,
                "test_model": bool(engine and engine.is_test_model),
                "workers": workers,
            }
        )

    # /healthz, /readyz and /metrics (/health above stays for compatibility).
    operations.install(app, runtime)

    app.add_middleware(
        BodyLimit,
        limit=runtime.settings.max_body_bytes,
        dialect=queue.QUEUE,
        prefixes=ERROR_PREFIXES,
    )
    # Outermost: every response, the body limit's 413 included, carries a request id and is
    # counted.
    app.add_middleware(operations.Observe)
    return app
