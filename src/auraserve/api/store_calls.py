"""Calling the (synchronous) store from async routes.

PostgreSQL calls go to the thread pool: they wait on the network. SQLite calls run inline on
the event loop: they take tens of microseconds, and handing them to a thread costs more than
running them. The hand-off makes the loop and the pool threads contend for the GIL, which
queues each hand-off behind the interpreter's 5 ms switch interval. Measured on the 2-core
machine, inline calls raised poll throughput several-fold (docs/benchmarks.md). A write that
must wait for another process's SQLite lock (the CLI) blocks the loop for that moment; admin
writes are single short transactions, so that wait is short.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable, Hashable
from typing import Any, ParamSpec, TypeVar

from starlette.concurrency import run_in_threadpool

from auraserve.runtime import Runtime

P = ParamSpec("P")
T = TypeVar("T")


async def call_store(runtime: Runtime, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    if runtime.db.is_sqlite:
        return fn(*args, **kwargs)
    return await run_in_threadpool(fn, *args, **kwargs)


# Per event loop: the renewals in flight, by what they renew.
_renewing: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, asyncio.Future[Any]]]
_renewing = weakref.WeakKeyDictionary()


async def refreshed(
    runtime: Runtime,
    key: Hashable,
    *,
    fresh: Callable[[], T | None],
    stale: Callable[[], T | None],
    fetch: Callable[[], T],
) -> T:
    """A value the store's caches hold: `fresh()` when it has one; else `fetch()` renews it
    (once per `key` at a time, however many requests ask meanwhile) and `stale()` answers
    now if it can (stale-while-revalidate), or the caller waits for the renewal.

    Why: every such cache entry expires every second or two, and the requests that then found
    it empty each went to the store (a thread hop on PostgreSQL, each waiting on the GIL's
    switch interval behind a busy event loop): tens of polls per expiry, 50-250 ms each, were
    the p99 of bench/scaleout.py's polls."""
    value = fresh()
    if value is not None:
        return value
    pending = renewal(runtime, key, fetch)
    value = stale()
    if value is not None:
        return value
    return await asyncio.shield(pending)


def renewal(runtime: Runtime, key: Hashable, fetch: Callable[[], T]) -> asyncio.Future[T]:
    """The store call in flight for `key` on this event loop, or a new one running `fetch`:
    however many requests ask meanwhile, one call. Await it through `asyncio.shield` (a
    cancelled request must not cancel the others' answer)."""
    loop = asyncio.get_running_loop()
    pending = _renewing.setdefault(loop, {})
    running: asyncio.Future[T] | None = pending.get(key)
    if running is None:
        running = asyncio.ensure_future(call_store(runtime, fetch))
        pending[key] = running
        running.add_done_callback(functools.partial(_renewed, pending, key))
    return running


def _renewed(pending: dict[Hashable, asyncio.Future[Any]], key: Hashable, renewal: Any) -> None:
    if pending.get(key) is renewal:
        del pending[key]
    if not renewal.cancelled():
        renewal.exception()  # whoever awaited it has it; a renewal nobody awaited may fail quietly
