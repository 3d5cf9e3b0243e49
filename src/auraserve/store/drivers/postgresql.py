"""The PostgreSQL driver (psycopg 3): row locks, LISTEN/NOTIFY, and the status poll's pooled
async read with a per-process cache of job rows.

Store calls go to a thread (`inline_calls` is False): they wait on the network. Pooled
connections are pinged only after sitting idle (`_ping_when_idle`). Events travel with the
transaction as `pg_notify` (sent at its COMMIT, to every listening process); a listener thread
(`PgListener`) feeds those into this process's bus. A batch of new jobs without webhooks is
one statement in autocommit (`submit_at_once`), so the account row it locks is held for that
statement only.

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
   before it may have missed a change). A `Store` without a listener (CLI commands) never
   caches, nor does a reader made without a bus.
4. The queue position is not cached with the row: it comes from `Store.positions` (or a
   count) at each read, as without the cache, so it may be POSITION_TTL old, as before.

A change made by another process is thus seen once its notification arrives (about a
millisecond); `PG_ROW_CACHE_TTL` bounds what no event announces (a connection that died
without a reset, a row changed by hand). Only found rows are cached, and a cached row answers
only the account that owns it (`account_id` never changes); anything else reads the database.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from cachetools import TTLCache
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy import Connection, create_engine, event, inspect, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Dialect, Engine, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, InvalidatePoolError, OperationalError
from sqlalchemy.pool import NullPool

from auraserve.core.jobs import Job
from auraserve.errors import StoreUnavailable
from auraserve.observability.logs import describe
from auraserve.store.drivers.base import Closeable, Compiled, Driver, JobReader, payloads
from auraserve.store.events import CHANNEL, LocalBus
from auraserve.store.reads import COUNT_AHEAD, QUEUED, SELECT_TENANT_JOB, QueuePositions

log = logging.getLogger(__name__)

T = TypeVar("T")

_MIGRATION_LOCK_ID = 0x61757261  # "aura": advisory lock so replicas never migrate at once
# A pooled connection unused for longer than this is pinged before it is handed out.
PING_AFTER_IDLE_SECONDS = 1.0
_LAST_USED = "auraserve_last_used"
_DIALECT: Dialect = postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]
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


class PostgresDriver(Driver):
    name = "postgresql"
    inline_calls = False
    insert = staticmethod(pg_insert)
    hears_every_commit = True
    submits_at_once = True

    def __init__(self, url: str) -> None:
        super().__init__(url)
        # What libpq and psycopg take (no SQLAlchemy driver name).
        self.conninfo = make_url(url).set(drivername="postgresql").render_as_string(False)

    def label(self) -> str:
        shown = make_url(self.url).set(drivername="postgresql")
        return f"PostgreSQL {shown.render_as_string(hide_password=True)}"

    def exists(self) -> bool:
        # Migrations record themselves in alembic_version: without it there is no store.
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return inspect(conn).has_table("alembic_version")
        finally:
            engine.dispose()

    def create_engine(self, *, pool_size: int, options: dict[str, Any]) -> Engine:
        engine = create_engine(
            self.url, pool_size=pool_size, max_overflow=20, execution_options=options
        )
        _ping_when_idle(engine)
        return engine

    @contextmanager
    def transaction(self, engine: Engine, *, write: bool) -> Iterator[Connection]:
        with engine.begin() as conn:
            yield conn

    def lock_migrations(self, conn: Connection) -> None:
        conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})

    def notify(self, conn: Connection, events: Sequence[tuple[str, str]]) -> None:
        if events:
            conn.execute(_NOTIFY, {"c": CHANNEL, "ps": payloads(events)})

    def join(self, bus: LocalBus) -> Closeable | None:
        listener = PgListener(self.conninfo, bus)
        listener.start()
        return listener

    def job_reader(self, positions: QueuePositions, bus: LocalBus) -> JobReader:
        return PgJobReader(self.url, positions, bus=bus)

    def submit_at_once(
        self,
        conn: Connection,
        rows: Sequence[dict[str, Any]],
        *,
        max_active: int,
        events: Sequence[tuple[str, str]],
    ) -> int | None:
        first = rows[0]
        reserved = conn.execute(
            _SUBMIT_MANY,
            {
                "acct": first["account_id"],
                "total": sum(r["price"] for r in rows),
                "count": len(rows),
                "max_active": max_active,
                "status": QUEUED,
                "priority": first["priority"],
                "max_attempts": first["max_attempts"],
                "ids": [r["id"] for r in rows],
                "models": [r["model_id"] for r in rows],
                "params": [r["params"] for r in rows],
                "batch_keys": [r["batch_key"] for r in rows],
                "num_images": [r["num_images"] for r in rows],
                "prices": [r["price"] for r in rows],
                "steps": [r["progress_total"] for r in rows],
                "times": [r["created_at"] for r in rows],
                "channel": CHANNEL,
                "payloads": payloads(events),
            },
        ).first()
        return None if reserved is None else int(reserved.balance)

    @staticmethod
    def is_unavailable(exc: BaseException) -> bool:
        # psycopg raises OperationalError for every server or network failure (refused, reset,
        # "terminating connection due to administrator command", timeouts) and InterfaceError
        # for a connection that is already closed.
        return isinstance(exc, OperationalError | InterfaceError)

    def close(self) -> None:
        pass  # it holds nothing of its own: the engine and the listener are the Store's


_NOTIFY = text("SELECT pg_notify(:c, p) FROM unnest(CAST(:ps AS text[])) AS p")

# `submit_at_once`: the guarded UPDATE runs first (the inserts read its result, so they happen
# only when it took the credits and slots); the statement commits on the server before it
# answers, so the account row is locked for the statement and its commit only. The events
# (`Store.at_once` collected them from the transition point) are notified in it too.
_SUBMIT_MANY = text(
    """
WITH reserved AS (
    UPDATE accounts
    SET balance = balance - :total, active_jobs = active_jobs + :count
    WHERE id = :acct AND balance >= :total AND active_jobs + :count <= :max_active
    RETURNING balance
), new AS (
    SELECT * FROM unnest(
        CAST(:ids AS text[]), CAST(:models AS text[]), CAST(:params AS text[]),
        CAST(:batch_keys AS text[]), CAST(:num_images AS integer[]),
        CAST(:prices AS bigint[]), CAST(:steps AS integer[]), CAST(:times AS float8[])
    ) AS n(id, model_id, params, batch_key, num_images, price, steps, created_at)
    WHERE EXISTS (SELECT 1 FROM reserved)
), inserted AS (
    INSERT INTO jobs (
        id, account_id, model_id, status, priority, params, batch_key, num_images, price,
        attempts, max_attempts, progress_step, progress_total, cancel_requested,
        created_at, updated_at
    )
    SELECT id, :acct, model_id, :status, :priority, params, batch_key, num_images, price,
        0, :max_attempts, 0, steps, false, created_at, created_at
    FROM new
    RETURNING id
), entries AS (
    INSERT INTO ledger (account_id, job_id, kind, amount, balance_delta, created_at)
    SELECT :acct, id, 'reserve', price, -price, created_at FROM new
), notified AS (
    SELECT pg_notify(:channel, p) FROM unnest(CAST(:payloads AS text[])) AS p
    WHERE EXISTS (SELECT 1 FROM inserted)
)
SELECT balance, (SELECT count(*) FROM notified) AS notified FROM reserved
"""
)


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection at checkout only when it sat unused for longer than
    `PING_AFTER_IDLE_SECONDS` (what `pool_pre_ping` does at every checkout, one round trip per
    transaction).

    A connection used a moment ago is alive but for an outage that began since; a statement on
    it then fails with a disconnect, which answers 503 (`is_unavailable`) and makes SQLAlchemy
    replace every pooled connection at its next checkout. Connections idle for longer (all of
    them, after an outage without traffic) are pinged, and a dead one is replaced before use,
    as pre-ping would. A failed ping invalidates the whole pool, as pre-ping's does."""

    def stamp(_dbapi_connection: Any, record: Any) -> None:
        record.info[_LAST_USED] = time.monotonic()

    def ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        last_used = record.info.get(_LAST_USED)
        if last_used is not None and time.monotonic() - last_used < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise InvalidatePoolError(f"ping failed: {exc}") from exc

    event.listen(engine, "connect", stamp)  # a new connection needs no ping
    event.listen(engine, "checkin", stamp)
    event.listen(engine, "checkout", ping_if_idle)


class PgListener:
    """A thread that LISTENs on PostgreSQL and republishes notifications on the local bus.

    The bus is `listening` from the moment LISTEN is in place until the connection is lost or
    the listener stops. A connection that dies silently (no reset reaches us) goes unnoticed
    until TCP gives up; caches that trust `listening` bound that with their own TTL."""

    def __init__(self, dsn: str, bus: LocalBus) -> None:
        self._dsn = dsn
        self._bus = bus
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-listener", daemon=True)
        # The server process of the current connection (None between connections): lets an
        # operator, or a test, find it in pg_stat_activity.
        self.backend_pid: int | None = None

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except Exception as exc:  # reconnect: the poll fallback covers the gap
                log.warning("PostgreSQL listener lost its connection (%s); reconnecting", exc)
                self._stop.wait(1.0)

    def _listen(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self.backend_pid = conn.info.backend_pid
            try:
                # From here on every commit that notifies reaches this bus.
                self._bus.set_listening(True)
                # Anything may have happened while we were not listening.
                self._bus.wake_workers()
                while not self._stop.is_set():
                    for note in conn.notifies(timeout=0.25, stop_after=100):
                        kind, _, job_id = note.payload.partition(":")
                        self._bus.deliver(kind, job_id)
            finally:
                # Before anything else: from now on changes may go unheard.
                self._bus.set_listening(False)
                self.backend_pid = None


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
    """Reads through a small `psycopg_pool.AsyncConnectionPool` on the API's event loop
    (autocommit, statements prepared by psycopg after a few uses), so a poll costs one round
    trip and no thread, and through the process's `JobRowCache` (see the module docstring).

    No pre-ping: a read that fails on a broken connection is retried once on a fresh
    connection (a read is idempotent); if that fails too the read raises `StoreUnavailable`
    (503 with Retry-After at the edge). While the database is unreachable, reads barely wait
    for the pool (whose reconnection backs off for seconds) and try one fresh connection
    each, so they answer 503 at once; when a fresh connection works where the pool gave none,
    the pool is replaced, so reads are served again the moment the database is."""

    _SELECT = Compiled(SELECT_TENANT_JOB, _DIALECT)
    _COUNT = Compiled(COUNT_AHEAD, _DIALECT)

    def __init__(
        self,
        url: str,
        positions: QueuePositions,
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

    async def get(self, job_id: str, *, account_id: str) -> Job | None:
        rows = self.rows
        row = rows.get(job_id, account_id) if rows is not None else None
        if row is None:
            seq = rows.seq if rows is not None else 0  # before the read: see JobRowCache
            row = await self._read(lambda conn: self._lookup(conn, job_id, account_id))
            if row is None:
                return None
            if rows is not None:
                rows.put(row, seq)
        position = await self.positions.of_async(row, self._count)
        return Job.from_row(row, queue_position=position)

    async def _lookup(self, conn: PgConnection, job_id: str, account_id: str) -> Any | None:
        cursor = await conn.execute(self._SELECT.sql, {"job_id": job_id, "acct": account_id})
        found = await cursor.fetchone()
        return None if found is None else self._SELECT.row(cursor.description, found)

    async def _count(self, params: dict[str, object]) -> int:
        async def count(conn: PgConnection) -> int:
            cursor = await conn.execute(self._COUNT.sql, self._COUNT.params(**params))
            found = await cursor.fetchone()
            if found is None:  # a count always returns its one row
                raise RuntimeError("a count returned no row")
            return int(found[0])

        return await self._read(count)

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
            if not self._unavailable(exc):
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
            if self._unavailable(exc):
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

    @staticmethod
    def _unavailable(exc: psycopg.Error) -> bool:
        """The SQLAlchemy path's verdict on a raw driver error (SQLAlchemy would wrap it by
        class), so this path refuses (503) exactly what that path refuses."""
        return PostgresDriver.is_unavailable(DBAPIError.instance(None, None, exc, psycopg.Error))

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
