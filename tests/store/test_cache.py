"""The one TTL cache helper: entries expire, the size is bounded, threads may share it."""

from __future__ import annotations

import threading
import time

from auraserve.store.cache import TtlCache


def test_entries_expire_after_the_ttl() -> None:
    cache: TtlCache[str, int] = TtlCache(ttl=0.2, maxsize=10)
    cache.put("a", 1)
    assert cache.get("a") == 1 and len(cache) == 1
    time.sleep(0.25)
    assert cache.get("a") is None
    assert len(cache) == 0


def test_the_size_is_bounded_and_clear_forgets_everything() -> None:
    cache: TtlCache[int, int] = TtlCache(ttl=60, maxsize=3)
    for i in range(10):
        cache.put(i, i)
    assert len(cache) == 3
    assert cache.get(9) == 9  # the newest stay
    cache.clear()
    assert len(cache) == 0 and cache.get(9) is None


def test_threads_can_share_it() -> None:
    cache: TtlCache[int, int] = TtlCache(ttl=60, maxsize=100)
    errors: list[BaseException] = []

    def hammer(offset: int) -> None:
        try:
            for i in range(2000):
                cache.put((offset + i) % 500, i)
                cache.get(i % 500)
        except BaseException as exc:  # pragma: no cover - only on a failure
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n * 7,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(cache) == 100


def test_a_grace_keeps_an_expired_entry_for_get_stale_only() -> None:
    cache: TtlCache[str, int] = TtlCache(ttl=0.2, maxsize=10, grace=0.5)
    cache.put("a", 1)
    time.sleep(0.25)
    assert cache.get("a") is None and len(cache) == 0  # no longer fresh
    assert cache.get_stale("a") == 1  # but kept to answer with while it is renewed
    cache.put("a", 2)
    assert cache.get("a") == 2
    cache.discard("a")
    assert cache.get_stale("a") is None
    cache.put("b", 3)
    time.sleep(0.75)
    assert cache.get_stale("b") is None  # past the grace too


def test_an_entry_ages_from_when_its_value_was_read() -> None:
    """`put(at=…)`: a value read a while ago is not fresh, nor stale, for longer than one
    read just now (the key cache's 2 s revocation promise counts from the read)."""
    cache: TtlCache[str, int] = TtlCache(ttl=0.5, maxsize=10, grace=0.5)
    now = time.monotonic()
    cache.put("young", 1, at=now)
    cache.put("read long ago", 2, at=now - 0.7)  # past the ttl, within the grace
    cache.put("older still", 3, at=now - 1.1)  # past both
    assert cache.get("young") == 1
    assert cache.get("read long ago") is None and cache.get_stale("read long ago") == 2
    assert cache.get("older still") is None and cache.get_stale("older still") is None
