"""Database access: one SQLAlchemy engine, explicit read and write transactions, migrations.

SQLite runs in WAL mode with one writer at a time. Python's sqlite3 driver would otherwise
open a deferred transaction and upgrade it to a write lock at the first write, which deadlocks
two writers against each other; we therefore issue `BEGIN IMMEDIATE` for write transactions
ourselves. Writers take turns on two locks first: a thread lock for this process's writers and
an flock on `<database>.write-lock` for other processes' (`serve --api-processes N`, a worker,
the CLI). SQLite's busy handler would also make them take turns, but it *sleeps* between
retries (1, 2, 5, 10 ms ...), so a writer that lost the race idles long after the lock is free;
a writer waiting on the flock is woken by the kernel the moment it is released. busy_timeout
stays as the fallback for writers that do not take the flock (other tools on the file).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, InvalidatePoolError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from auraserve.core.jobs import Job
from auraserve.errors import StoreUnavailable
from auraserve.observability import metrics
from auraserve.store.cache import TtlCache
from auraserve.store.events import LocalBus, PgListener, SqliteFanout, take_events
from auraserve.store.migrations import HEAD_REVISION
from auraserve.store.urls import normalise_database_url

if sys.platform != "win32":
    import fcntl

if TYPE_CHECKING:
    from auraserve.store.keys import Account

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_MIGRATION_LOCK_ID = 0x61757261  # "aura": advisory lock so replicas never migrate at once
_DATABASE_OPTION = "auraserve_database"

TransitionHook = Callable[[Connection, Job], None]
"""Runs inside the transaction that moves a job to a new status, so whatever it writes (the
webhook outbox's delivery rows) commits or rolls back with that status."""

CommittedHook = Callable[[Job], None]
"""Runs after the transaction that changed a job's status committed (metrics): a rolled-back
change is never seen, and a failing hook cannot undo the change."""
_COMMITTED_KEY = "auraserve_committed_jobs"

# SQLite's OperationalError also means "no such table" or a syntax error; only these messages
# say the file cannot be used right now.
_SQLITE_UNAVAILABLE = ("database is locked", "unable to open", "disk i/o", "disk is full")

# Every request authenticates; a verified key is remembered for a moment so hot polling does
# not repeat the lookup. Revoking through a Database clears its cache at once; a revocation
# made elsewhere (the CLI, another replica) takes effect within AUTH_CACHE_TTL +
# AUTH_CACHE_GRACE = 2 seconds (the documented promise), counted from the lookup's start.
AUTH_CACHE_TTL = 1.0
# After the TTL, reads (GET) may still answer with a key's account while one lookup renews it
# (api.auth), so no poll waits on the store each time it expires; never longer than this, and
# never for a request that writes (a submit waits for a lookup instead: api.auth).
AUTH_CACHE_GRACE = 1.0
AUTH_CACHE_MAX = 10_000

# Queue positions are advisory and only move when the queue head moves, so each process keeps
# them for a moment: a client (or many) polling a deep queue costs one count per job per
# POSITION_TTL instead of one per poll.
POSITION_TTL = 0.5
# After that a position may still answer async polls while one count renews it
# (store.job_reads), so no poll waits for a count each time it expires.
POSITION_GRACE = 30.0
POSITION_CACHE_MAX = 50_000

# PostgreSQL: a pooled connection unused for longer than this is pinged before it is handed
# out (see `_ping_when_idle`).
PING_AFTER_IDLE_SECONDS = 1.0
_LAST_USED = "auraserve_last_used"


class Database:
    """Owns the engine; hands out short transactions. Thread-safe.

    It also carries what belongs to one store rather than to the process: the transition hooks
    and the short-lived caches, so two `Database` objects (tests, a CLI next to a server) never
    see each other's.
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        auth_cache_ttl: float = AUTH_CACHE_TTL,
        position_ttl: float = POSITION_TTL,
    ) -> None:
        url = normalise_database_url(url)
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.bus = LocalBus()
        self.auth_cache: TtlCache[str, Account] = TtlCache(
            ttl=auth_cache_ttl, maxsize=AUTH_CACHE_MAX, grace=AUTH_CACHE_GRACE
        )
        self.positions: TtlCache[str, int] = TtlCache(
            ttl=position_ttl, maxsize=POSITION_CACHE_MAX, grace=POSITION_GRACE
        )
        self._transition_hooks: list[TransitionHook] = []
        self._committed_hooks: list[CommittedHook] = []
        # Every connection names its Database, so store functions that get only a connection
        # (`jobs.submit_in`, run in a caller's transaction) still find its hooks and caches.
        options = {_DATABASE_OPTION: self}
        self._listener: PgListener | None = None
        self._fanout: SqliteFanout | None = None
        self._write_lock = threading.Lock() if self.is_sqlite else None
        self.writer_file_lock: WriterFileLock | None = None
        if self.is_sqlite:
            if sqlite3.sqlite_version_info < (3, 35):
                raise RuntimeError(
                    f"SQLite {sqlite3.sqlite_version} is too old: auraserve needs 3.35+ "
                    "for UPDATE … RETURNING"
                )
            db_path = url.split(":///", 1)[-1]
            if db_path and db_path != ":memory:":
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
                if not db_path.startswith("file:"):  # a URI names no plain path to put it beside
                    self.writer_file_lock = WriterFileLock.beside(Path(db_path))
            self.engine: Engine = create_engine(
                url,
                pool_size=pool_size,
                max_overflow=20,
                connect_args={"check_same_thread": False, "timeout": 30},
                execution_options=options,
            )
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
        else:
            self.engine = create_engine(
                url,
                pool_size=pool_size,
                max_overflow=20,
                execution_options=options,
            )
            _ping_when_idle(self.engine)
        self.on_committed_transition(metrics.observe_transition)

    def on_transition(self, hook: TransitionHook) -> None:
        """Run `hook` in every status change made through this database (once per hook)."""
        if hook not in self._transition_hooks:
            self._transition_hooks.append(hook)

    def on_committed_transition(self, hook: CommittedHook) -> None:
        """Run `hook(job)` after each committed status change made in `write()` (once per
        hook). A hook's exception is swallowed: the change is already committed."""
        if hook not in self._committed_hooks:
            self._committed_hooks.append(hook)
        self.on_transition(_remember_transition)

    @property
    def transition_hooks(self) -> tuple[TransitionHook, ...]:
        return tuple(self._transition_hooks)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A transaction that will write. On SQLite, writers take turns: this process's on a
        thread lock, other processes' on the lock file (see the module docstring).

        A database that cannot be reached raises `StoreUnavailable` (see `is_unavailable`):
        before the COMMIT, nothing of the transaction happened; during it (`in_doubt`), the
        server may have committed it, and only a later read can tell."""
        stage = _Stage()
        with _unavailable_as_error(stage):
            if self._write_lock is None:
                with self.engine.begin() as conn:
                    _take_committed(conn)  # drop leftovers of a rolled-back transaction
                    take_events(conn)
                    yield conn
                    events = take_events(conn)
                    changed = _take_committed(conn)
                    stage.committing = True  # leaving `begin()` sends the COMMIT
            else:
                # The thread lock first: flock excludes open files, not threads, and this
                # process's writers share one.
                with self._write_lock, self.engine.connect() as conn:
                    conn = conn.execution_options(auraserve_immediate=True)
                    _take_committed(conn)  # drop leftovers of a rolled-back transaction
                    take_events(conn)
                    file_lock = self.writer_file_lock
                    with file_lock.held() if file_lock else nullcontext(), conn.begin():
                        yield conn
                        stage.committing = True
                    events = take_events(conn)
                    changed = _take_committed(conn)
        self.committed(events, changed)

    @contextmanager
    def statement(self) -> Iterator[Connection]:
        """PostgreSQL: a connection in autocommit, for one statement that is a whole
        transaction. The server commits it before it answers, so a lock the statement takes is
        not held across a round trip to this process (and its GIL) until a COMMIT arrives.
        The caller reports what it changed to `committed`. An unreachable database raises
        `StoreUnavailable`, `in_doubt` once the connection was handed out: a statement that
        reached the server may have committed."""
        stage = _Stage()
        with _unavailable_as_error(stage), self.engine.connect() as conn:
            stage.committing = True
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    def committed(self, events: list[tuple[str, str]], changed: list[Job]) -> None:
        """After a commit: wake whoever waits on these jobs (now it is safe: they can see the
        rows), then run the committed-transition hooks."""
        with self.bus.batch():
            for kind, job_id in events:
                self.bus.publish(kind, job_id)
        for job in changed:
            for hook in self._committed_hooks:
                try:
                    hook(job)
                except Exception:
                    log.exception("a committed-transition hook failed")

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction; on SQLite it never blocks writers (WAL).

        On SQLite no BEGIN is sent: each statement then reads its own consistent snapshot,
        which is all the readers here need, and it saves a round of statement overhead on
        the hottest path (status polls). An unreachable database raises `StoreUnavailable`."""
        with _unavailable_as_error(), self.engine.connect() as conn:
            if self.is_sqlite:
                conn = conn.execution_options(auraserve_autocommit=True)
            with conn.begin():
                yield conn

    def migrate(self, on_step: Callable[[int, int], None] | None = None) -> None:
        """Bring the schema to the newest revision; safe to call from many processes at once.
        `on_step(done, total)` hears of each revision applied (the CLI's progress bar)."""
        if self.schema_is_current():
            return
        # Alembic costs about half a second to import; an admin command on a current store
        # (the common case) never needs it.
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.write() as conn:
            if not self.is_sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
            cfg.attributes["connection"] = conn
            if on_step is not None:
                current = MigrationContext.configure(conn).get_current_revision()
                script = ScriptDirectory.from_config(cfg)
                total = len(list(script.iterate_revisions("heads", current)))
                done = [0]
                on_step(0, total)

                def applied(**_: Any) -> None:
                    done[0] += 1
                    on_step(done[0], total)

                cfg.attributes["on_version_apply"] = applied
            command.upgrade(cfg, "head")

    def schema_is_current(self) -> bool:
        """True when the store exists and its schema is at `HEAD_REVISION`; an unreachable
        store raises `StoreUnavailable` rather than passing for a new one."""
        try:
            with self.read() as conn:
                version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except DBAPIError:
            return False  # no alembic_version table yet: a new store
        return version == HEAD_REVISION

    def start_listener(self) -> None:
        """Hear other processes' events: PostgreSQL's LISTEN, or on SQLite the file's datagram
        fan-out (`serve --api-processes N`, a worker beside a server on one machine)."""
        if self.is_sqlite:
            if self._fanout is None:
                self._fanout = SqliteFanout.join(self)
            return
        if self._listener is not None:
            return
        dsn = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._listener = PgListener(dsn, self.bus)
        self._listener.start()

    def dispose(self) -> None:
        if self._fanout is not None:
            self._fanout.close()
            self._fanout = None
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        self.engine.dispose()
        if self.writer_file_lock is not None:
            self.writer_file_lock.close()


class WriterFileLock:
    """An exclusive flock on a file beside a SQLite database, taken by every write transaction,
    so writers in different processes queue in the kernel instead of in SQLite's sleeping busy
    handler.

    Not thread-safe: callers hold `Database._write_lock` around it (flock excludes open file
    descriptions, so two threads sharing the descriptor would both get it). The descriptor is
    opened per process: a forked child that kept its parent's would share the parent's lock
    instead of waiting for it. It is never held across an await: writes are synchronous.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._pid = 0

    @classmethod
    def beside(cls, database: Path) -> WriterFileLock | None:
        """The lock for `database` (`<database>.write-lock`); None where there is no flock."""
        if sys.platform == "win32":
            return None
        return cls(database.with_name(database.name + ".write-lock"))

    def fileno(self) -> int | None:
        """This process's descriptor, opened on first use; None when the file cannot be
        opened (then writers rely on busy_timeout alone)."""
        pid = os.getpid()
        if self._pid == pid:
            return self._fd
        self.close()  # inherited over fork: closing our copy leaves the parent's lock alone
        self._pid = pid
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.warning("no writer lock file %s (%s): writers rely on busy_timeout", self.path, exc)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._pid = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        fd = self.fileno()
        if fd is None:
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)  # releases the GIL while it waits
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


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


def is_unavailable(exc: BaseException) -> bool:
    """True when `exc` says the database cannot be used right now (down, restarting, the
    connection cut, the pool exhausted, SQLite's file locked or unreadable) rather than that
    a statement is wrong: such a failure is a 503 to retry, never a 500."""
    if isinstance(exc, StoreUnavailable | PoolTimeout):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError) and _is_sqlite_error(exc):
        return any(part in str(exc.orig).lower() for part in _SQLITE_UNAVAILABLE)
    # psycopg raises OperationalError for every server or network failure (refused, reset,
    # "terminating connection due to administrator command", timeouts) and InterfaceError
    # for a connection that is already closed.
    return isinstance(exc, OperationalError | InterfaceError)


def _is_sqlite_error(exc: DBAPIError) -> bool:
    return isinstance(exc.orig, sqlite3.Error)


class _Stage:
    """How far a write got: set once its COMMIT (or its one autocommit statement) is sent."""

    committing = False


@contextmanager
def _unavailable_as_error(stage: _Stage | None = None) -> Iterator[None]:
    try:
        yield
    except (DBAPIError, PoolTimeout) as exc:
        if not is_unavailable(exc):
            raise
        raise StoreUnavailable(in_doubt=stage is not None and stage.committing) from exc


def _remember_transition(conn: Connection, job: Job) -> None:
    conn.info.setdefault(_COMMITTED_KEY, []).append(job)


def _take_committed(conn: Connection) -> list[Job]:
    changed: list[Job] = conn.info.pop(_COMMITTED_KEY, [])
    return changed


def database_of(conn: Connection) -> Database:
    """The `Database` whose engine opened `conn`."""
    db = conn.get_execution_options().get(_DATABASE_OPTION)
    if not isinstance(db, Database):
        raise RuntimeError("this connection was not opened by an auraserve Database")
    return db


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take transaction control away from the driver (see the module docstring).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL is durable against process crashes in WAL mode; only an OS crash can lose the
    # last commits, which is the standard trade for a local single-node store.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    options = conn.get_execution_options()
    if options.get("auraserve_autocommit"):
        return  # the driver is in autocommit mode; its commit at the end is a no-op
    statement = "BEGIN IMMEDIATE" if options.get("auraserve_immediate") else "BEGIN"
    # Straight to the driver: SQLAlchemy's statement machinery (exec_driver_sql) cost several
    # times the BEGIN itself. Errors are wrapped as SQLAlchemy wraps them, so a locked or
    # unreadable file still reads as unavailable (`is_unavailable`).
    try:
        conn.connection.dbapi_connection.execute(statement)  # type: ignore[union-attr]
    except sqlite3.Error as exc:
        raise DBAPIError.instance(statement, None, exc, sqlite3.Error) from exc
