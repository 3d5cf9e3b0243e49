"""Store calls from async code (`Store.call`, `Store.refreshed`): `refreshed` renews a cached
value once while callers answer with the stale one; a key revoked elsewhere stops working once
its renewal comes back."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from auraserve.api.auth import account_for_key
from auraserve.config import Settings
from auraserve.store import keys
from auraserve.store.cache import TtlCache
from auraserve.store.db import Store


def test_one_renewal_at_a_time_while_callers_answer_with_the_stale_value(db: Store) -> None:
    cache: TtlCache[str, int] = TtlCache(ttl=0.1, maxsize=4, grace=60)
    fetches: list[int] = []

    def fetch() -> int:
        fetches.append(len(fetches) + 1)
        time.sleep(0.05)  # a slow store (on PostgreSQL this runs in a thread)
        cache.put("k", 100 + len(fetches))
        return 100 + len(fetches)

    async def ask() -> int:
        return await db.refreshed(
            "k",
            fresh=lambda: cache.get("k"),
            stale=lambda: cache.get_stale("k"),
            fetch=fetch,
        )

    async def scenario() -> None:
        # Nothing known: all of them wait for the one fetch.
        assert await asyncio.gather(*(ask() for _ in range(20))) == [101] * 20
        assert fetches == [1]
        await asyncio.sleep(0.15)  # expired, kept for the grace
        # The stale value answers at once; one renewal runs behind it.
        assert await asyncio.gather(*(ask() for _ in range(20))) == [101] * 20
        deadline = time.monotonic() + 5
        while cache.get("k") is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert fetches == [1, 2] and await ask() == 102

    asyncio.run(scenario())


def test_a_key_revoked_elsewhere_is_refused_once_its_renewal_returns(settings: Settings) -> None:
    server = Store(settings.resolved_database_url, auth_cache_ttl=0.2)
    server.migrate()
    cli = Store(settings.resolved_database_url)
    try:
        created = keys.create_account(cli, "a", credits=1)
        runtime: Any = SimpleNamespace(db=server)

        async def scenario() -> None:
            account = await account_for_key(runtime, created.key)
            assert account is not None and account.id == created.account_id
            assert keys.revoke_key(cli, created.key_id)
            await asyncio.sleep(0.3)  # past the TTL
            # Not fresh: the fast path's kind of caller still gets the stale answer at once,
            # while one lookup renews it...
            assert await account_for_key(runtime, created.key, wait=False) == account
            deadline = time.monotonic() + 5
            while keys.stale_account(server, created.key) is not None:
                assert time.monotonic() < deadline, "the renewal never came back"
                await asyncio.sleep(0.01)
            # ...which found it revoked: from now on it is refused.
            assert await account_for_key(runtime, created.key, wait=False) is None
            assert await account_for_key(runtime, created.key) is None

        asyncio.run(scenario())
    finally:
        server.dispose()
        cli.dispose()
