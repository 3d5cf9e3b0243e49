"""What operators and orchestrators ask of a process: liveness, readiness, metrics, and the
per-request middleware that feeds the logs (request id) and the HTTP metrics.

- `GET /healthz`: the process serves HTTP (200 always). A liveness probe: restart when it fails.
- `GET /readyz`: the store answers, its schema is current, and (when this process runs
  in-process workers) one of them has loaded and warmed up its model. 503 otherwise, naming
  the failed check. A readiness probe: send traffic only when it passes. API-only processes
  (`AURASERVE_WORKERS=0`) are ready when the store is.
- `GET /health`: the older summary (version, model, workers), kept for compatibility; it
  answers 200 even while warming up (`status: "starting"`), so probes should use the two above.
- `GET /metrics`: Prometheus text (`observability.metrics`), plus the store's gauges sampled
  at scrape time.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auraserve.errors import StoreUnavailable
from auraserve.observability import metrics
from auraserve.observability.logs import REQUEST_ID, describe
from auraserve.runtime import Runtime
from auraserve.store import stats, workers

REQUEST_ID_HEADER = b"x-request-id"
# A caller's id is kept when it is a sane token (a load balancer's, a client's); anything
# else is replaced, so log lines never carry arbitrary bytes.
_REQUEST_ID_RE = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")
# In-process workers in these states have a model loaded and warmed up.
_SERVING_STATES = frozenset({"ready", "busy"})


class Observe:
    """Pure ASGI, outermost: sets the request id (echoed as `X-Request-Id`) for the logs, and
    counts each request by method, route template (never the raw path: ids would make the
    label set unbounded) and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.http = metrics.HttpMetrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500  # unless a response starts: a client gone before it, or a crash
        root_path = scope.get("root_path", "")

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                # A dialect's own `x-request-id` (the job's request id, which its clients
                # read) wins: one header, one meaning per response.
                if not any(name.lower() == REQUEST_ID_HEADER for name, _ in headers):
                    headers.append((REQUEST_ID_HEADER, request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
            self.http.observe(
                scope["method"], _route_of(scope, root_path), status, time.perf_counter() - started
            )


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER:
            if _REQUEST_ID_RE.fullmatch(value):
                return str(value.decode())
            break
    return uuid.uuid4().hex


def _route_of(scope: Scope, root_path: str) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    mounted = scope.get("root_path", "")
    if isinstance(mounted, str) and mounted != root_path:  # a Mount (static files)
        return f"{mounted[len(root_path) :]}/{{path}}"
    return "unmatched"


class Liveness(BaseModel):
    status: Literal["ok"] = "ok"


class Check(BaseModel):
    ok: bool
    detail: str = Field(description="What was checked, or why it failed")


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    failed: list[str] = Field(description="Names of the checks that failed")
    checks: dict[str, Check] = Field(description="store, schema, and workers when in-process")


def install(app: FastAPI, runtime: Runtime) -> None:
    """The operations routes and the store collector for this app's runtime."""
    store_metrics = CollectorRegistry(auto_describe=False)
    store_metrics.register(
        metrics.StoreCollector(
            lambda: stats.sample(runtime.db, stale_seconds=runtime.settings.worker_stale_seconds),
            models=sorted(runtime.settings.presets),
        )
    )

    @app.get(
        "/healthz",
        tags=["operations"],
        summary="Liveness: the process serves HTTP",
        response_model=Liveness,
    )
    async def healthz() -> Liveness:
        return Liveness()

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Readiness: store reachable, schema current, a worker's model warmed up",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "A check failed; see `failed`"}},
    )
    async def readyz() -> JSONResponse:
        checks = await runtime.db.call(_store_checks, runtime)
        if runtime.workers:
            states = [w.state.value for w in runtime.workers]
            ready = any(s in _SERVING_STATES for s in states)
            checks["workers"] = Check(ok=ready, detail=f"in-process workers: {', '.join(states)}")
        elif runtime.workers_in_supervisor and checks["store"].ok:
            # An API child of `serve --api-processes N`: the workers run in the supervisor;
            # the registry says whether one of them has warmed up.
            checks["workers"] = await runtime.db.call(_registry_check, runtime)
        failed = [name for name, check in checks.items() if not check.ok]
        body = Readiness(status="not_ready" if failed else "ready", failed=failed, checks=checks)
        return JSONResponse(body.model_dump(), status_code=503 if failed else 200)

    @app.get("/metrics", tags=["operations"], include_in_schema=False)
    async def metrics_route() -> Response:
        # The store sample is a query: off the event loop on PostgreSQL (Store.call).
        body = await runtime.db.call(metrics.exposition, store_metrics)
        return Response(body, media_type=CONTENT_TYPE_LATEST)


def _registry_check(runtime: Runtime) -> Check:
    try:
        rows = workers.list_workers(runtime.db)
    except StoreUnavailable:
        return Check(ok=False, detail="unknown: the store is unreachable")
    now = time.time()
    serving = [
        w.id
        for w in rows
        if w.is_live(runtime.settings.worker_stale_seconds, now) and w.state in _SERVING_STATES
    ]
    if serving:
        return Check(ok=True, detail=f"registered workers ready: {', '.join(sorted(serving))}")
    return Check(ok=False, detail="no registered worker has warmed up yet")


def _store_checks(runtime: Runtime) -> dict[str, Check]:
    try:
        current = runtime.db.schema_is_current()
    except StoreUnavailable as exc:
        cause = describe(exc.__cause__) if exc.__cause__ is not None else exc.message
        return {
            "store": Check(ok=False, detail=f"unreachable: {cause}"),
            "schema": Check(ok=False, detail="unknown: the store is unreachable"),
        }
    return {
        "store": Check(ok=True, detail="reachable"),
        "schema": Check(
            ok=current,
            detail="at the newest migration"
            if current
            else "behind the code's migrations: run `auraserve db upgrade`",
        ),
    }
