"""The status poll's fast path: `GET /v2/requests/status/{request_id}` answered without
FastAPI's routing and dependency injection when nothing about the request is unusual.

Polls are the service's hottest request (clients poll every job until it ends), and at
thousands a second FastAPI's own work per request (matching, dependency solving, its exception
and exit-stack middlewares) cost more than finding the job (bench/scaleout.py: the cached poll
ran no faster than `/healthz`). This pure-ASGI layer, inside the app's own middlewares
(request id, metrics, error handler, body limit), answers the common case itself: a key this
process verified lately (`auth.account_for_key`, without waiting for the store), no query
string, and a job of that account without a webhook. It builds the answer with the route's
own function (`results.status_response`, the one status read), so it is the route's answer,
byte for byte (tests/api/test_fast_status.py compares them).

Anything else goes to the FastAPI route untouched, which answers as it always did: no key or
an uncached one, an unknown id or another account's (404), a job with a webhook (its body is
rendered through the store), an error of the store. Nothing is sent before the fast path
knows it answers, so falling through is always safe.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from auraserve.api import results
from auraserve.api.auth import account_for_key, presented_key
from auraserve.errors import AuraserveError
from auraserve.runtime import Runtime

__all__ = ["PATH_PREFIX", "FastStatus"]

PATH_PREFIX = "/v2/requests/status/"
_TEMPLATE = PATH_PREFIX + "{request_id}"


class FastStatus:
    """ASGI middleware: the fast path in front of the app's router."""

    def __init__(self, app: ASGIApp, runtime: Runtime, routes: Sequence[BaseRoute]) -> None:
        """`routes`: the router that holds the route this stands in for (its path must be
        `PATH_PREFIX` + `{request_id}`); requests answered here are counted under it."""
        self.app = app
        self.runtime = runtime
        found = [r for r in routes if getattr(r, "path", None) == _TEMPLATE]
        if not found:
            raise RuntimeError(f"no route {_TEMPLATE} to stand in for")
        self.route = found[0]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope["query_string"]:
            path: str = scope["path"]
            request_id = path[len(PATH_PREFIX) :]
            if path.startswith(PATH_PREFIX) and request_id and "/" not in request_id:
                response = await self._answer(scope, request_id)
                if response is not None:
                    scope["route"] = self.route
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope, request_id: str) -> JSONResponse | None:
        """The route's response when this is the common case, else None (the route answers)."""
        raw = presented_key(Request(scope))
        account = await account_for_key(self.runtime, raw, wait=False) if raw else None
        if account is None:
            return None
        try:
            return await results.status_response(
                self.runtime, account.id, request_id, plain_only=True
            )
        except AuraserveError:  # a 404 or the store's 503: the route renders it in its dialect
            return None
