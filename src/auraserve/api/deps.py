"""The routes' dependencies: the runtime and the caller's account (as `Annotated` aliases), and
the route's dialect.

Every dependency here is `async def` on purpose: FastAPI runs a plain `def` dependency in the
thread pool, and that hand-off per request cost more than a whole status lookup
(docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.params import Depends as DependsParam
from starlette.types import Scope

from auraserve.api.auth import current_account
from auraserve.api.dialect import Dialect
from auraserve.api.state import api_state
from auraserve.runtime import Runtime
from auraserve.store.keys import Account

# Where a route's dialect is kept for the error handlers: in the ASGI scope, which the
# exception handlers see too (the routing has already run when they are called).
_SCOPE_KEY = "auraserve.dialect"


async def runtime_dep(request: Request) -> Runtime:
    return api_state(request).runtime


def use_dialect(dialect: Dialect) -> DependsParam:
    """A router dependency that sets its routes' dialect, before any other dependency (the
    key check included) can raise, so every error of the route comes out in its shape."""

    async def mark(request: Request) -> None:
        request.scope[_SCOPE_KEY] = dialect

    marker: DependsParam = Depends(mark)
    return marker


def dialect_of(scope: Scope) -> Dialect | None:
    """The dialect a route set, or None for a request that matched no route."""
    value = scope.get(_SCOPE_KEY)
    return value if isinstance(value, Dialect) else None


RuntimeDep = Annotated[Runtime, Depends(runtime_dep)]
CurrentAccount = Annotated[Account, Depends(current_account)]
