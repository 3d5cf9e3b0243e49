"""Per-account rate limits: requests per minute and jobs in flight.

Requests per minute use the `limits` library's moving window, kept in this process by default
or in Redis (`AURASERVE_REDIS_URL`) so that several API replicas share one budget per
account. Jobs in flight are counted by the store itself, in the submit transaction (see
`api.submit`), so they are exact across replicas without Redis.

Responses carry the IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers):
`RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (seconds until the window frees a
slot) and `RateLimit-Policy`; a refusal is 429 with `Retry-After`.

If Redis is unreachable the limiter lets requests through and logs: a broken counter must not
take the whole API down, and the queue limit still protects the workers.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from auraserve.config import Settings
from auraserve.errors import RateLimited
from auraserve.store.keys import Account

log = logging.getLogger(__name__)

_WARN_EVERY = 60.0  # seconds between repeated "Redis is down" warnings
_REDIS_TIMEOUT = 1.0  # seconds


@dataclass(frozen=True)
class Quota:
    """Where an account stands in its per-minute window after this request."""

    limit: int
    remaining: int
    reset: int  # seconds until a slot frees up

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset),
            "RateLimit-Policy": f"{self.limit};w=60",
        }


def concurrency_refusal(limit: int, message: str, retry_after: int = 5) -> RateLimited:
    """The 429 for an account whose jobs in flight reached `limit`."""
    return RateLimited(
        message,
        retry_after=retry_after,
        headers={
            "RateLimit-Limit": str(limit),
            "RateLimit-Remaining": "0",
            "RateLimit-Reset": str(retry_after),
        },
    )


class RateLimiter:
    """Counts submits per account; create inside the event loop that will use it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.backend = "redis" if settings.redis_url else "memory"
        storage: Storage
        if settings.redis_url:
            storage = RedisStorage(
                "async+" + settings.redis_url,
                implementation="redispy",
                key_prefix=settings.rate_limit_key_prefix,
                wrap_exceptions=True,
                # A Redis that does not answer must cost a submit a second, not minutes.
                socket_connect_timeout=_REDIS_TIMEOUT,
                socket_timeout=_REDIS_TIMEOUT,
            )
        else:
            storage = MemoryStorage()
        self._storage = storage
        self._limiter = MovingWindowRateLimiter(storage)
        self._last_warning = 0.0

    def per_minute(self, account: Account) -> int:
        if account.requests_per_minute is not None:
            return account.requests_per_minute
        return self.settings.rate_limit_per_minute

    def max_concurrent(self, account: Account) -> int:
        """The account's cap on jobs in flight (0: none beyond the queue limit)."""
        if account.max_concurrent is not None:
            return account.max_concurrent
        return self.settings.rate_limit_max_concurrent

    async def hit(self, account: Account) -> Quota | None:
        """Count one request; raises RateLimited when over. None when unlimited (or when the
        shared store is down and we fail open)."""
        limit = self.per_minute(account)
        if limit <= 0:
            return None
        item: RateLimitItem = RateLimitItemPerMinute(limit)
        try:
            allowed = await self._limiter.hit(item, "rpm", account.id)
            stats = await self._limiter.get_window_stats(item, "rpm", account.id)
        except Exception as exc:  # Redis down or misconfigured: fail open, loudly
            now = time.monotonic()
            if now - self._last_warning > _WARN_EVERY:
                self._last_warning = now
                log.warning("rate limiter unavailable (%s); letting requests through", exc)
            return None
        reset = max(0, math.ceil(stats.reset_time - time.time()))
        quota = Quota(limit=limit, remaining=max(0, stats.remaining), reset=reset)
        if not allowed:
            raise RateLimited(
                f"Rate limit exceeded: {limit} requests per minute for this account; "
                f"retry in {max(1, reset)} s",
                retry_after=max(1, reset),
                headers=quota.headers(),
            )
        return quota

    async def reset(self) -> None:
        """Forget every counter (tests)."""
        await self._storage.reset()

    async def close(self) -> None:
        # redis-py's asyncio pool is bound to the loop that created it; close it there.
        client = getattr(getattr(self._storage, "bridge", None), "storage", None)
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # closing is best effort
                pass
