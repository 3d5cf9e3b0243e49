"""A small thread-safe TTL cache: the one way this package remembers answers for a moment.

`cachetools.TTLCache` does the expiry and the bounding (least recently used entries go first
when full); it is not thread-safe, and the API's thread pool and the worker threads share a
`Store`, hence the lock. Entries are never handed out past their deadline: `get` not past
`ttl`, `get_stale` not past `ttl + grace`, both counted from when the value was read (`put`'s
`at`), not from when it was stored.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from cachetools import TTLCache

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """At most `maxsize` entries, each forgotten `ttl` seconds (monotonic) after it was put.

    With a `grace`, an entry past its `ttl` is kept that much longer for `get_stale`: async
    callers answer with it while one fetch renews it (stale-while-revalidate), so nobody waits
    for the store each time an entry expires; `get` never returns it."""

    def __init__(self, *, ttl: float, maxsize: int, grace: float = 0.0) -> None:
        self.ttl = ttl
        self.grace = grace
        # Each value with the monotonic time it stops being fresh.
        self._entries: TTLCache[K, tuple[V, float]] = TTLCache(maxsize=maxsize, ttl=ttl + grace)
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            found = self._entries.get(key)
        if found is None or time.monotonic() >= found[1]:
            return None
        return found[0]

    def get_stale(self, key: K) -> V | None:
        """The entry's value even past its `ttl` (within the grace): to answer with while a
        fresh one is fetched."""
        with self._lock:
            found = self._entries.get(key)
        # TTLCache counts from the put; an entry put with an earlier `at` ends earlier.
        if found is None or time.monotonic() >= found[1] + self.grace:
            return None
        return found[0]

    def put(self, key: K, value: V, *, at: float | None = None) -> None:
        """Remember `value`; `at`: when it was read (`time.monotonic()` before the read), so
        a value whose read took a while is not kept longer than one read at once."""
        start = time.monotonic() if at is None else at
        with self._lock:
            self._entries[key] = (value, start + self.ttl)

    def discard(self, key: K) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            # TTLCache drops expired entries lazily, at its next write; count only fresh ones.
            self._entries.expire()
            now = time.monotonic()
            return sum(1 for _, fresh_until in self._entries.values() if now < fresh_until)


class Flights(Generic[K, V]):
    """At most one call in flight per key, on one event loop: whoever asks while it runs gets
    its future. Await it through `asyncio.shield` (a cancelled request must not cancel the
    others' answer)."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Future[V]] = {}

    def start(self, key: K, call: Callable[[], Awaitable[V]]) -> asyncio.Future[V]:
        running = self._running.get(key)
        if running is None:
            running = self._running[key] = asyncio.ensure_future(call())
            running.add_done_callback(functools.partial(self._landed, key))
        return running

    def _landed(self, key: K, flight: asyncio.Future[V]) -> None:
        if self._running.get(key) is flight:
            del self._running[key]
        if not flight.cancelled():
            flight.exception()  # whoever awaited it has it; one nobody awaited may fail quietly
