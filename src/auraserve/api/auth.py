"""API keys → accounts. Every dialect accepts all three headers, so a client of any of the
hosted APIs can keep its own header: `Ocp-Apim-Subscription-Key` (the Queue API), `x-api-key`
(the Sync API) and `Authorization: Bearer` (OpenAI Images)."""

from __future__ import annotations

from fastapi import Request

from auraserve.api.store_calls import refreshed
from auraserve.errors import Forbidden, Unauthorized
from auraserve.runtime import Runtime
from auraserve.store import keys
from auraserve.store.keys import Account


def presented_key(request: Request) -> str | None:
    headers = request.headers
    for name in ("ocp-apim-subscription-key", "x-api-key"):
        value = headers.get(name)
        if value:
            return value.strip()
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


async def current_account(request: Request) -> Account:
    raw = presented_key(request)
    if raw is None:
        raise Unauthorized(
            "Missing API key: send it in Ocp-Apim-Subscription-Key, x-api-key or "
            "Authorization: Bearer"
        )
    runtime: Runtime = request.app.state.runtime
    account = await account_for_key(runtime, raw)
    if account is None:
        raise Unauthorized("Invalid or revoked API key")
    request.state.account = account
    return account


async def account_for_key(runtime: Runtime, raw: str, *, wait: bool = True) -> Account | None:
    """The account of a presented key. A key verified a moment ago is answered on the event
    loop (on PostgreSQL that saves a thread-pool hand-off per poll); one verified a little
    longer ago is too, while one lookup renews it (`store_calls.refreshed`). `wait=False`:
    None rather than waiting for the store (a key this process has not seen lately)."""
    db = runtime.db
    if not wait and keys.stale_account(db, raw) is None:
        return None
    return await refreshed(
        runtime,
        ("key", raw),
        fresh=lambda: keys.cached_account(db, raw),
        stale=lambda: keys.stale_account(db, raw),
        fetch=lambda: keys.authenticate(db, raw),
    )


def require_admin(account: Account) -> None:
    if not account.is_admin:
        raise Forbidden(
            "This endpoint needs an admin key (an operator makes one with "
            "`auraserve keys create --name NAME --admin`)"
        )
