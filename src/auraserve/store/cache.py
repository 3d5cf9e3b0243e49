"""A small thread-safe TTL cache: the one way this package remembers answers for a moment.

`cachetools.TTLCache` does the expiry and the bounding (least recently used entries go first
when full); it is not thread-safe, and the API's thread pool and the worker threads share a
`Database`, hence the lock. Entries are never handed out past their deadline.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

from cachetools import TTLCache

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """At most `maxsize` entries, each forgotten `ttl` seconds (monotonic) after it was put."""

    def __init__(self, *, ttl: float, maxsize: int) -> None:
        self.ttl = ttl
        self._entries: TTLCache[K, V] = TTLCache(maxsize=maxsize, ttl=ttl)
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._entries[key] = value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            # TTLCache drops expired entries lazily, at its next write; count only live ones.
            self._entries.expire()
            return len(self._entries)
