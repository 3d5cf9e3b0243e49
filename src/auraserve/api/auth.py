"""API keys → accounts. Every dialect accepts all three headers, so a client of any of the
hosted APIs can keep its own header: `Ocp-Apim-Subscription-Key` (the Queue API), `x-api-key`
(the Sync API) and `Authorization: Bearer` (OpenAI Images)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from fastapi import Request

from auraserve.api.state import api_state
from auraserve.errors import Forbidden, Unauthorized
from auraserve.runtime import Runtime
from auraserve.store import keys
from auraserve.store.db import AUTH_CACHE_TTL, Store
from auraserve.store.keys import Account, Verified


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
    runtime = api_state(request).runtime
    # Only reads may answer with a key's account while its lookup is renewed: a request that
    # writes (submit, sync and OpenAI generation, cancel) spends credits, so it waits for a
    # lookup unless the key was verified within AUTH_CACHE_TTL.
    writes = request.method not in _READS
    account = await account_for_key(runtime, raw, fresh_only=writes)
    if account is None:
        raise Unauthorized("Invalid or revoked API key")
    request.state.account = account
    return account


_READS = frozenset({"GET", "HEAD", "OPTIONS"})


async def account_for_key(
    runtime: Runtime, raw: str, *, wait: bool = True, fresh_only: bool = False
) -> Account | None:
    """The account of a presented key, never from a lookup that began more than
    `AUTH_CACHE_TTL + AUTH_CACHE_GRACE` (2 s) ago: that bounds how long a key revoked elsewhere
    (the CLI, another API process) keeps working.

    A key verified within `AUTH_CACHE_TTL` is answered on the event loop (on PostgreSQL that
    saves a thread-pool hand-off per poll); one verified within the grace after it is too,
    while one lookup renews it, unless `fresh_only` (requests that write). `wait=False`: None
    rather than waiting for the store (a key this process has not seen lately)."""
    db = runtime.db
    account = keys.cached_account(db, raw)
    if account is not None:
        return account
    stale = None if fresh_only else keys.stale_account(db, raw)
    if stale is None and not wait:
        return None
    asked = time.monotonic()
    verified = await _looked_up(runtime, raw, stale)
    if isinstance(verified, Account):
        return verified
    if verified.account is not None and verified.started < asked - AUTH_CACHE_TTL:
        # A lookup that began well before this request (a slow store) may predate a
        # revocation: ask again, from now.
        verified = await asyncio.shield(runtime.db.renewal(("key", raw), _lookup(db, raw)))
    return verified.account


async def _looked_up(runtime: Runtime, raw: str, stale: Account | None) -> Account | Verified:
    """`stale` when there is one (a lookup renews it behind this answer), else the lookup."""
    pending = runtime.db.renewal(("key", raw), _lookup(runtime.db, raw))
    if stale is not None:
        return stale
    return await asyncio.shield(pending)


def _lookup(db: Store, raw: str) -> Callable[[], Verified]:
    return lambda: keys.lookup(db, raw)


def require_admin(account: Account) -> None:
    if not account.is_admin:
        raise Forbidden(
            "This endpoint needs an admin key (an operator makes one with "
            "`auraserve keys create --name NAME --admin`)"
        )
