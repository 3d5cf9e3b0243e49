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

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from starlette.concurrency import run_in_threadpool

from auraserve.runtime import Runtime

P = ParamSpec("P")
T = TypeVar("T")


async def call_store(runtime: Runtime, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    if runtime.db.is_sqlite:
        return fn(*args, **kwargs)
    return await run_in_threadpool(fn, *args, **kwargs)
