"""The status poll's read: one job by id, scoped to an account, without SQLAlchemy's per-call
machinery. Clients poll far more often than anything else happens, so this one read gets its
own path; every other read keeps `store.jobs`.

The SQL is not written twice: the statements of `store.jobs` (the tenant-scoped select and
the queue-position count, `COUNT_AHEAD`) are compiled once per dialect, and the rows they
return feed `Job.from_row` as SQLAlchemy's rows do, so a job read here equals the one
`jobs.get(..., account_id=...)` returns. Queue positions share `Database.positions` with
`jobs.queue_position_in`.

- SQLite: a raw `sqlite3` connection per thread, autocommit (each statement reads its own WAL
  snapshot, as `Database.read` does), `query_only`. Called inline on the event loop: a read
  takes microseconds, a thread hand-off costs more (see `api.store_calls`).
- PostgreSQL: a small `psycopg_pool.AsyncConnectionPool` on the API's event loop (autocommit,
  statements prepared by psycopg after a few uses), so a poll costs one round trip and no
  thread. No pre-ping: a read that fails on a broken connection is retried once on a fresh
  connection (a read is idempotent); if that fails too the read raises `StoreUnavailable`
  (503 with Retry-After at the edge). While the database is unreachable, reads barely wait
  for the pool (whose reconnection backs off for seconds) and try one fresh connection each,
  so they answer 503 at once; when a fresh connection works where the pool gave none, the
  pool is replaced, so reads are served again the moment the database is.

PostgreSQL job rows are also cached per process (`JobRowCache`, a few seconds, 10,000 rows),
so a poll of a job that did not change costs no round trip. The rules that keep it correct:

1. Every change of a job row emits a JOB or WORK event for that job in its transaction
   (`store.events.emit_in`; `emit_each_in` for bulk updates such as retention). The bus hands
   each one to the cache (`LocalBus.on_job_event`), which drops the job's row: this process's
   own commits right after they commit, other processes' when their NOTIFY arrives.
2. A row read from the database is cached only if no job event at all (and no change of the
   listening state) arrived while it was read: the cache's invalidation counter is taken
   before the read and compared, under the cache's lock, when the row is put. A row read
   before a change whose event came during the read is thus never cached after that event.
3. The cache is used only while the bus is `listening` (the process's PgListener has its
   LISTEN in place). When the listener's connection is lost the cache is emptied and stops
   serving until LISTEN is in place again (whose start empties it once more: a read begun
   before it may have missed a change). A `Database` without a listener (CLI commands) never
   caches, nor does a reader made without a bus.
4. The queue position is not cached with the row: it comes from `Database.positions` (or a
   count) at each read, as without the cache, so it may be POSITION_TTL old, as before.

A change made by another process is thus seen once its notification arrives (about a
millisecond); `PG_ROW_CACHE_TTL` bounds what no event announces (a connection that died
without a reset, a row changed by hand). Only found rows are cached, and a cached row answers
only the account that owns it (`account_id` never changes); anything else reads the database.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections import namedtuple
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

import psycopg
from cachetools import TTLCache
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy import Select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError

from auraserve.core.jobs import Job
from auraserve.errors import StoreUnavailable
from auraserve.observability.logs import describe
from auraserve.store.cache import TtlCache
from auraserve.store.db import Database, is_unavailable
from auraserve.store.events import LocalBus
from auraserve.store.jobs import _SELECT_TENANT_JOB, COUNT_AHEAD, QUEUED, count_ahead_params

log = logging.getLogger(__name__)

T = TypeVar("T")

# PostgreSQL pool per API process: a poll holds a connection for one round trip, so a few
# connections carry thousands of polls a second. Up to 8: with fewer than the concurrent
# polls, reads queue inside psycopg_pool, whose waiting path costs ~30 us of CPU a read
# (measured, 8 concurrent readers: 4 connections 120 us/read, 8 connections 90 us/read). It
# grows only under such concurrency and shrinks back after psycopg_pool's max_idle (10 min);
# every API process of every replica opens its own.
PG_POOL_MIN = 1
PG_POOL_MAX = 8
# How long a read waits for a pooled connection, and a fresh connection for the server, before
# the poll answers 503: short, so a dead database is a quick 503 rather than a hung request.
PG_CHECKOUT_TIMEOUT = 2.0
PG_CONNECT_TIMEOUT = 2  # libpq counts whole seconds (and treats 1 as 2)
# While reads find the database unreachable, they wait this long for a pooled connection (one
# may still be alive, e.g. when only new connections are refused) before a fresh attempt.
PG_DOWN_CHECKOUT_TIMEOUT = 0.1
# The per-process cache of job rows (see the module docstring): events keep it fresh; the TTL
# only bounds what no event announces.
PG_ROW_CACHE_TTL = 2.0
PG_ROW_CACHE_MAX = 10_000
# A WAL reader is almost never blocked; this bounds the rare wait (WAL recovery after a crash)
# that would otherwise hold the event loop.
SQLITE_BUSY_TIMEOUT = 5.0

# The parameter styles the raw drivers take: sqlite3 `:name`, psycopg `%(name)s`.
_SQLITE: Dialect = sqlite.dialect(paramstyle="named")
_PSYCOPG: Dialect = postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]


class _Cursor(Protocol):
    @property
    def description(self) -> Any: ...


class _Compiled:
    """A statement's text in one dialect's parameter style, with the constants SQLAlchemy
    turned into parameters (the status literal, the LIMIT) filled in."""

    def __init__(self, statement: Select[Any], dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = compiled.string
        self._constants = {k: v for k, v in compiled.params.items() if v is not None}
        self._make_row: Callable[[Sequence[Any]], Any] | None = None

    def params(self, **values: object) -> dict[str, object]:
        return {**self._constants, **values}

    def row(self, cursor: _Cursor, values: Sequence[Any]) -> Any:
        """`values` with attribute access by column name (what `Job.from_row` reads), in a
        row class made once, from the first result's column names. (Only then is the
        cursor's description read: psycopg builds it anew, column by column, at each read.)"""
        make = self._make_row
        if make is None:
            names = [column[0] for column in cursor.description]
            make = self._make_row = cast(Any, namedtuple("Row", names))._make
        return make(values)


def _count_of(row: Sequence[Any] | None) -> int:
    if row is None:  # a count always returns its one row
        raise RuntimeError("a count returned no row")
    return int(row[0])


class JobReader(ABC):
    """Reads one job of one account for a status poll; see the module docstring."""

    def __init__(self, positions: TtlCache[str, int]) -> None:
        self.positions = positions

    @abstractmethod
    async def get(self, job_id: str, *, account_id: str) -> Job | None:
        """The job, if it exists and belongs to `account_id` (else None), with its queue
        position when QUEUED; equal to `store.jobs.get(db, job_id, account_id=account_id)`.
        Raises `StoreUnavailable` when the database cannot be reached."""

    async def aclose(self) -> None:
        """Close what lives on the event loop (the API's lifespan calls this at shutdown)."""
        self.close()

    @abstractmethod
    def close(self) -> None:
        """Close the connections (idempotent); a later read opens new ones."""


def open_job_reader(db: Database) -> JobReader:
    """The reader of `db`'s store, sharing its queue-position cache. (`Database` has no
    in-memory SQLite, which a second connection could not see.)"""
    if db.is_sqlite:
        url = make_url(db.url)
        return SqliteJobReader(url.database or "", db.positions, uri=url.query.get("uri") == "true")
    return PgJobReader(db.url, db.positions, bus=db.bus)


# --- SQLite ------------------------------------------------------------------------------------


class SqliteJobReader(JobReader):
    _SELECT = _Compiled(_SELECT_TENANT_JOB, _SQLITE)
    _COUNT = _Compiled(COUNT_AHEAD, _SQLITE)

    def __init__(self, path: str, positions: TtlCache[str, int], *, uri: bool = False) -> None:
        super().__init__(positions)
        self.path = path
        self._uri = uri
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    async def get(self, job_id: str, *, account_id: str) -> Job | None:
        # Runs to completion without awaiting: the loop is held for one indexed lookup.
        try:
            return self._get(job_id, account_id)
        except sqlite3.OperationalError as exc:
            if _unavailable(exc, sqlite3.Error):
                raise StoreUnavailable() from exc
            raise

    def _get(self, job_id: str, account_id: str) -> Job | None:
        conn = self._connection()
        # fetchall steps each statement to its end, which ends its read snapshot at once.
        cursor = conn.execute(self._SELECT.sql, {"job_id": job_id, "acct": account_id})
        found = cursor.fetchall()
        if not found:
            return None
        row = self._SELECT.row(cursor, found[0])
        position = None
        if row.status == QUEUED:
            position = self.positions.get(row.id)
            if position is None:
                params = self._COUNT.params(**count_ahead_params(row))
                counted = conn.execute(self._COUNT.sql, params).fetchall()
                position = _count_of(counted[0] if counted else None)
                self.positions.put(row.id, position)
        return Job.from_row(row, queue_position=position)

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path,
                timeout=SQLITE_BUSY_TIMEOUT,
                isolation_level=None,  # autocommit: no transaction is left open between polls
                check_same_thread=False,  # only so that close() may close it from any thread
                uri=self._uri,
            )
            conn.execute("PRAGMA query_only=1")
            with self._lock:
                self._opened.append(conn)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
            self._local = threading.local()
        for conn in opened:
            conn.close()


# --- PostgreSQL --------------------------------------------------------------------------------

PgConnection = psycopg.AsyncConnection[Any]


class JobRowCache:
    """Job rows by job id, trusted only while `bus` is listening; see the module docstring.

    Thread-safe: reads happen on the event loop, invalidations on whichever thread delivers
    an event (a writer after its commit, the listener thread)."""

    def __init__(
        self, bus: LocalBus, *, ttl: float = PG_ROW_CACHE_TTL, maxsize: int = PG_ROW_CACHE_MAX
    ) -> None:
        self._bus = bus
        self._rows: TTLCache[str, Any] = TTLCache(maxsize=maxsize, ttl=ttl)
        self._lock = threading.Lock()
        # Counts invalidations: a read may cache its row only if none happened meanwhile.
        self._seq = 0
        bus.on_job_event(self.invalidate)

    @property
    def seq(self) -> int:
        """Take before reading the database; pass to `put`."""
        return self._seq

    def get(self, job_id: str, account_id: str) -> Any | None:
        """The row of `job_id` if cached and it belongs to `account_id`, else None."""
        if not self._bus.listening:
            return None
        with self._lock:
            row = self._rows.get(job_id)
        if row is None or row.account_id != account_id:
            return None
        return row

    def put(self, row: Any, seq: int) -> bool:
        """Cache `row` if no invalidation came since `seq` was taken and the bus listens;
        returns whether it did."""
        with self._lock:
            if seq != self._seq or not self._bus.listening:
                return False
            self._rows[row.id] = row
            return True

    def invalidate(self, job_id: str | None) -> None:
        """Forget `job_id`'s row (every row for None), and refuse rows read meanwhile."""
        with self._lock:
            self._seq += 1
            if job_id is None:
                self._rows.clear()
            else:
                self._rows.pop(job_id, None)

    def __contains__(self, job_id: object) -> bool:
        with self._lock:
            return job_id in self._rows

    def __len__(self) -> int:
        with self._lock:
            self._rows.expire()
            return len(self._rows)


class PgJobReader(JobReader):
    _SELECT = _Compiled(_SELECT_TENANT_JOB, _PSYCOPG)
    _COUNT = _Compiled(COUNT_AHEAD, _PSYCOPG)

    def __init__(
        self,
        url: str,
        positions: TtlCache[str, int],
        *,
        bus: LocalBus | None = None,
        max_size: int = PG_POOL_MAX,
        checkout_timeout: float = PG_CHECKOUT_TIMEOUT,
        row_cache_ttl: float = PG_ROW_CACHE_TTL,
    ) -> None:
        super().__init__(positions)
        self.conninfo = make_url(url).set(drivername="postgresql").render_as_string(False)
        self.max_size = max_size
        self.checkout_timeout = checkout_timeout
        # Rows are cached only where the bus hears every change (see the module docstring).
        self.rows = JobRowCache(bus, ttl=row_cache_ttl) if bus is not None else None
        self._pool: AsyncConnectionPool[PgConnection] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: set[asyncio.Task[None]] = set()
        # Since when reads find the database unreachable (monotonic); None while it answers.
        self.down_since: float | None = None
        # Queue positions being counted (`_recount`).
        self._counting: dict[str, asyncio.Future[int | None]] = {}

    async def get(self, job_id: str, *, account_id: str) -> Job | None:
        rows = self.rows
        if rows is None:
            found = await self._read(lambda conn: self._lookup(conn, job_id, account_id))
        else:
            row = rows.get(job_id, account_id)
            if row is not None:
                return await self._job_of(row)
            seq = rows.seq  # before the read: an event during it keeps its row out
            found = await self._read(lambda conn: self._lookup(conn, job_id, account_id))
            if found is not None:
                rows.put(found[0], seq)
        if found is None:
            return None
        row, position = found
        return Job.from_row(row, queue_position=position)

    async def _lookup(
        self, conn: PgConnection, job_id: str, account_id: str
    ) -> tuple[Any, int | None] | None:
        """The job's row and, when QUEUED, its queue position."""
        cursor = await conn.execute(self._SELECT.sql, {"job_id": job_id, "acct": account_id})
        found = await cursor.fetchone()
        if found is None:
            return None
        row = self._SELECT.row(cursor, found)
        return row, await self._position(conn, row)

    async def _position(self, conn: PgConnection, row: Any) -> int | None:
        if row.status != QUEUED:
            return None
        position = self.positions.get(row.id)
        if position is None:
            cursor = await conn.execute(
                self._COUNT.sql, self._COUNT.params(**count_ahead_params(row))
            )
            position = _count_of(await cursor.fetchone())
            self.positions.put(row.id, position)
        return position

    async def _job_of(self, row: Any) -> Job:
        """The job of a cached row, with its queue position (the shared position cache, else
        a count: `_recount`)."""
        position = None
        if row.status == QUEUED:
            position = self.positions.get(row.id)
            if position is None:
                position = await self._recount(row)
        return Job.from_row(row, queue_position=position)

    async def _recount(self, row: Any) -> int | None:
        """A new count of a cached row's queue position, one at a time per job. Polls that
        arrive while it runs answer with the job's previous count (a position is approximate,
        up to POSITION_TTL old, anyway), or wait for this one when there is none. Without
        this, every poll in flight when the position expired ran its own count, a scan of the
        queue ahead, and those polls made the p99 (bench/scaleout.py: 26-46 ms, /healthz's 14)."""
        counting = self._counting.get(row.id)
        if counting is None:
            counting = asyncio.ensure_future(self._read(lambda conn: self._position(conn, row)))
            self._counting[row.id] = counting
            counting.add_done_callback(functools.partial(self._counted, row.id))
        previous = self.positions.get_stale(row.id)
        if previous is not None:
            return previous
        return await asyncio.shield(counting)

    def _counted(self, job_id: str, task: asyncio.Future[int | None]) -> None:
        if self._counting.get(job_id) is task:
            del self._counting[job_id]
        if not task.cancelled():
            task.exception()  # retrieved: the polls that awaited it got it; others need not

    async def _read(self, work: Callable[[PgConnection], Awaitable[T]]) -> T:
        pool = self._pool if self._loop is asyncio.get_running_loop() else None
        if pool is None:
            pool = await self._open_pool()
        # While the database is unreachable the pool has nothing to give: barely wait for it.
        wait = self.checkout_timeout if self.down_since is None else PG_DOWN_CHECKOUT_TIMEOUT
        try:
            async with pool.connection(timeout=wait) as conn:
                result = await work(conn)
        except PoolTimeout as exc:
            # No connection came: all busy for seconds, or none can be made (its reconnection
            # backs off for seconds). One fresh connection tells which, and serves this read.
            first: Exception = exc
        except psycopg.Error as exc:
            if not _unavailable(exc, psycopg.Error):
                raise
            first = exc  # a broken connection (the server restarted, a proxy cut it)
        else:
            self._recovered()
            return result
        # The pool drops a broken connection on its return; this read takes a fresh one.
        try:
            result = await self._on_fresh_connection(work)
        except StoreUnavailable:
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.warning(
                    "status reads: database unreachable (%s); reads answer 503 until it returns",
                    describe(first),
                )
            raise
        self._recovered()
        if isinstance(first, PoolTimeout):
            # A new connection works where the pool gave none: do not wait out its back-off.
            self._discard_pool()
        return result

    def _recovered(self) -> None:
        if self.down_since is None:  # the common case: it was not down
            return
        log.warning(
            "status reads: database reachable again after %.1f s",
            time.monotonic() - self.down_since,
        )
        self.down_since = None

    async def _on_fresh_connection(self, work: Callable[[PgConnection], Awaitable[T]]) -> T:
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.conninfo,
                autocommit=True,
                connect_timeout=PG_CONNECT_TIMEOUT,
            )
            async with conn:
                return await work(conn)
        except psycopg.Error as exc:
            if _unavailable(exc, psycopg.Error):
                raise StoreUnavailable() from exc
            raise

    async def _open_pool(self) -> AsyncConnectionPool[PgConnection]:
        """The pool on the running loop, opened at the first read (the API's loop). A pool
        left on another loop (a runtime served by a second app) is closed on that loop."""
        loop = asyncio.get_running_loop()
        if self._pool is not None and self._loop is not loop:
            self._discard_pool()
        pool = AsyncConnectionPool[PgConnection](
            self.conninfo,
            min_size=PG_POOL_MIN,
            max_size=self.max_size,
            timeout=self.checkout_timeout,
            kwargs={"autocommit": True, "connect_timeout": PG_CONNECT_TIMEOUT},
            name="auraserve status reads",
            open=False,
        )
        await pool.open(wait=False)  # the first connection is made in the background
        if self._pool is not None and self._loop is loop:
            await pool.close()  # a concurrent first read opened one meanwhile: use that
            return self._pool
        self._pool, self._loop = pool, loop
        return pool

    def _discard_pool(self) -> None:
        """Forget the pool now and close it in the background, on its own loop."""
        pool, loop = self._pool, self._loop
        self._pool = self._loop = None
        if pool is None or loop is None or loop.is_closed():
            return
        if loop is _running_loop():
            task = loop.create_task(pool.close(timeout=1.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        elif loop.is_running():
            asyncio.run_coroutine_threadsafe(pool.close(timeout=1.0), loop)

    async def aclose(self) -> None:
        pool = self._pool if self._loop is asyncio.get_running_loop() else None
        if pool is not None:
            self._pool = self._loop = None
            await pool.close(timeout=5.0)
        else:
            self._discard_pool()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def close(self) -> None:
        # From synchronous code (Runtime.close): the pool's loop is normally gone by now, its
        # connections closed by the API's lifespan (aclose).
        self._discard_pool()
        if self.rows is not None:
            self.rows.invalidate(None)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _unavailable(exc: Exception, driver_base: type[Exception]) -> bool:
    """`store.db.is_unavailable`'s verdict on a raw driver error, so this path refuses
    (503) exactly what the SQLAlchemy path refuses: SQLAlchemy wraps the error by class as it
    would have."""
    wrapped = DBAPIError.instance(None, None, exc, driver_base)
    return is_unavailable(wrapped)
