"""Per-account caps on long-lived requests: open status streams and waiting sync requests.

A stream or a sync wait holds a connection, a task and a store waiter for minutes, so one key
with thousands of them slowed every other tenant. Each account may hold at most
`AURASERVE_MAX_STREAMS_PER_ACCOUNT` streams and `AURASERVE_MAX_SYNC_WAITS_PER_ACCOUNT` sync
waits at once, per API process; beyond that the request gets 429 with `Retry-After`, in its
dialect's shape. The slot is a router dependency (`app.py` attaches it when it includes the
routers), held until the response, the whole event stream included, has been sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from enum import StrEnum

from fastapi import Depends, Request
from fastapi.params import Depends as DependsParam

from auraserve.api.auth import current_account
from auraserve.api.deps import RuntimeDep, use_dialect
from auraserve.api.dialect import Dialect
from auraserve.api.state import api_state
from auraserve.config import Settings
from auraserve.errors import LongRequestLimitReached

RETRY_AFTER_SECONDS = 5


class Kind(StrEnum):
    STREAM = "open status streams"
    SYNC_WAIT = "waiting sync requests"

    def cap(self, settings: Settings) -> int:
        if self is Kind.STREAM:
            return settings.max_streams_per_account
        return settings.max_sync_waits_per_account

    @property
    def setting(self) -> str:
        if self is Kind.STREAM:
            return "AURASERVE_MAX_STREAMS_PER_ACCOUNT"
        return "AURASERVE_MAX_SYNC_WAITS_PER_ACCOUNT"


class LongLivedSlots:
    """The open long-lived requests of one process, per account and kind. Only the event loop
    touches it, so plain counters suffice."""

    def __init__(self) -> None:
        self._held: dict[tuple[Kind, str], int] = {}

    def held(self, kind: Kind, account_id: str) -> int:
        return self._held.get((kind, account_id), 0)

    def take(self, kind: Kind, account_id: str, cap: int) -> None:
        held = self.held(kind, account_id)
        if held >= cap:
            raise LongRequestLimitReached(
                f"this account already has {held} {kind.value} (at most {cap} at once, "
                f"{kind.setting}); close one or retry later",
                retry_after=RETRY_AFTER_SECONDS,
            )
        self._held[(kind, account_id)] = held + 1

    def give_back(self, kind: Kind, account_id: str) -> None:
        left = self.held(kind, account_id) - 1
        if left > 0:
            self._held[(kind, account_id)] = left
        else:
            self._held.pop((kind, account_id), None)


def hold_slot(kind: Kind, dialect: Dialect, applies: Callable[[Request], bool]) -> DependsParam:
    """A router dependency holding a `kind` slot of the caller's account for the requests
    `applies` picks (the router's long-lived routes); others pass untouched, key check
    included, so that for instance an unknown path still answers 404.

    It marks the router's dialect itself first: router dependencies given at inclusion run
    before the router's own, and a 429 must come out in the route's shape."""

    async def hold(
        request: Request,
        runtime: RuntimeDep,
        # A default, not `Annotated`: the annotation would be evaluated without this closure.
        _dialect: object = use_dialect(dialect),
    ) -> AsyncIterator[None]:
        if not applies(request):
            yield
            return
        account = await current_account(request)
        slots = api_state(request).long_lived
        slots.take(kind, account.id, kind.cap(runtime.settings))
        try:
            yield
        finally:
            slots.give_back(kind, account.id)

    marker: DependsParam = Depends(hold)
    return marker


def endpoint_is(endpoint: Callable[..., object]) -> Callable[[Request], bool]:
    """`applies` for one route, known by its endpoint function (not by its URL)."""
    return lambda request: request.scope.get("endpoint") is endpoint


def method_is(method: str) -> Callable[[Request], bool]:
    """`applies` for a router whose every `method` route is long-lived."""
    return lambda request: request.method == method
