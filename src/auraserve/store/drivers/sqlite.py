"""The SQLite driver: a local file in WAL mode, one writer at a time.

Python's sqlite3 driver would open a deferred transaction and upgrade it to a write lock at
the first write, which deadlocks two writers against each other; write transactions
therefore issue `BEGIN IMMEDIATE` themselves. Writers take turns on two locks first: a thread
lock for this process's writers and an flock on `<database>.write-lock` for other processes'
(`serve --api-processes N`, a worker, the CLI). SQLite's busy handler would also make them take
turns, but it *sleeps* between retries (1, 2, 5, 10 ms ...), so a writer that lost the race
idles long after the lock is free; a writer waiting on the flock is woken by the kernel the
moment it is released. busy_timeout stays as the fallback for writers that do not take the
flock (other tools on the file).

Reads send no BEGIN: each statement reads its own consistent snapshot, which is all the
readers here need, and it saves a round of statement overhead on the hottest path. SQLite has
no NOTIFY: processes that share one file join a datagram fan-out (`SqliteFanout`). Store calls
run inline on the event loop (`inline_calls`): they take tens of microseconds, and handing
them to a thread costs more (docs/benchmarks.md).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import logging
import os
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, event
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError

from auraserve.core.jobs import Job
from auraserve.errors import StoreUnavailable
from auraserve.store.drivers.base import Closeable, Compiled, Driver, JobReader
from auraserve.store.events import LocalBus
from auraserve.store.reads import COUNT_AHEAD, SELECT_TENANT_JOB, QueuePositions

if sys.platform != "win32":
    import fcntl

log = logging.getLogger(__name__)

# OperationalError also means "no such table" or a syntax error; only these messages say the
# file cannot be used right now.
_UNAVAILABLE = ("database is locked", "unable to open", "disk i/o", "disk is full")
# A WAL reader is almost never blocked; this bounds the rare wait (WAL recovery after a crash)
# that would otherwise hold the event loop.
SQLITE_BUSY_TIMEOUT = 5.0
_DIALECT: Dialect = sqlite.dialect(paramstyle="named")


class SqliteDriver(Driver):
    name = "sqlite"
    inline_calls = True
    insert = staticmethod(sqlite_insert)
    hears_every_commit = False  # the fan-out drops datagrams when a peer's buffer is full

    def __init__(self, url: str) -> None:
        super().__init__(url)
        if sqlite3.sqlite_version_info < (3, 35):
            raise RuntimeError(
                f"SQLite {sqlite3.sqlite_version} is too old: auraserve needs 3.35+ "
                "for UPDATE … RETURNING"
            )
        parsed = make_url(url)
        self.path = parsed.database or ""
        self.uri = parsed.query.get("uri") == "true"
        self._write_lock = threading.Lock()
        self.writer_file_lock: WriterFileLock | None = None

    @property
    def local_file(self) -> Path | None:
        if not self.path or self.path == ":memory:" or self.path.startswith("file:"):
            return None  # a URI names no plain path to put files beside
        return Path(self.path)

    def label(self) -> str:
        return f"SQLite {self.path}"

    def exists(self) -> bool:
        file = self.local_file
        return file is not None and file.is_file()

    def create_engine(self, *, pool_size: int, options: dict[str, Any]) -> Engine:
        file = self.local_file
        if file is not None:
            _private_files(file)
            self.writer_file_lock = WriterFileLock.beside(file)
        engine = create_engine(
            self.url,
            pool_size=pool_size,
            max_overflow=20,
            connect_args={"check_same_thread": False, "timeout": 30},
            execution_options=options,
        )
        event.listen(engine, "connect", _on_connect)
        event.listen(engine, "begin", _on_begin)
        return engine

    @contextmanager
    def transaction(self, engine: Engine, *, write: bool) -> Iterator[Connection]:
        if not write:
            with engine.connect() as conn:
                conn = conn.execution_options(auraserve_autocommit=True)
                with conn.begin():
                    yield conn
            return
        # The thread lock first: flock excludes open files, not threads, and this process's
        # writers share one.
        file_lock = self.writer_file_lock
        with self._write_lock, engine.connect() as conn:
            conn = conn.execution_options(auraserve_immediate=True)
            with file_lock.held() if file_lock else nullcontext(), conn.begin():
                yield conn

    def lock_migrations(self, conn: Connection) -> None:
        pass  # BEGIN IMMEDIATE already holds every other writer off

    def notify(self, conn: Connection, events: Sequence[tuple[str, str]]) -> None:
        pass  # events travel outside the file, after the commit (`join`)

    def join(self, bus: LocalBus) -> Closeable | None:
        file = self.local_file
        return None if file is None else SqliteFanout.join(file, bus)

    def job_reader(self, positions: QueuePositions, bus: LocalBus) -> JobReader:
        return SqliteJobReader(self, positions)

    def is_unavailable(self, exc: BaseException) -> bool:
        if isinstance(exc, OperationalError) and isinstance(exc.orig, sqlite3.Error):
            return any(part in str(exc.orig).lower() for part in _UNAVAILABLE)
        return False

    def close(self) -> None:
        if self.writer_file_lock is not None:
            self.writer_file_lock.close()


def _private_files(path: Path) -> None:
    """Make the database 0600 before SQLite opens it: SQLite gives its -wal and -shm files
    the database file's mode, so they follow. Files made by an older version (0644) are
    tightened too."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600)


class WriterFileLock:
    """An exclusive flock on a file beside a SQLite database, taken by every write transaction,
    so writers in different processes queue in the kernel instead of in SQLite's sleeping busy
    handler.

    Not thread-safe: callers hold `SqliteDriver._write_lock` around it (flock excludes open file
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


class SqliteJobReader(JobReader):
    """Reads through a raw `sqlite3` connection per thread, autocommit (each statement reads
    its own WAL snapshot, as `Store.read` does), `query_only`, inline on the event loop."""

    _SELECT = Compiled(SELECT_TENANT_JOB, _DIALECT)
    _COUNT = Compiled(COUNT_AHEAD, _DIALECT)

    def __init__(self, driver: SqliteDriver, positions: QueuePositions) -> None:
        super().__init__(positions)
        self._driver = driver
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    async def get(self, job_id: str, *, account_id: str) -> Job | None:
        try:  # to completion without awaiting: the loop is held for one indexed lookup
            return self._get(job_id, account_id)
        except sqlite3.OperationalError as exc:
            wrapped = DBAPIError.instance(None, None, exc, sqlite3.Error)
            if self._driver.is_unavailable(wrapped):
                raise StoreUnavailable() from exc
            raise

    def _get(self, job_id: str, account_id: str) -> Job | None:
        conn = self._connection()
        cursor = conn.execute(self._SELECT.sql, {"job_id": job_id, "acct": account_id})
        found = cursor.fetchall()
        if not found:
            return None
        row = self._SELECT.row(cursor.description, found[0])

        def count(params: dict[str, object]) -> int:
            # fetchall steps the statement to its end, which ends its read snapshot at once.
            counted = conn.execute(self._COUNT.sql, self._COUNT.params(**params)).fetchall()
            return int(counted[0][0])

        return Job.from_row(row, queue_position=self.positions.of(row, count))

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self._driver.path,
                timeout=SQLITE_BUSY_TIMEOUT,
                isolation_level=None,  # autocommit: no transaction is left open between polls
                check_same_thread=False,  # only so that close() may close it from any thread
                uri=self._driver.uri,
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


# AF_UNIX socket paths are at most 107 bytes on Linux.
_MAX_SOCKET_PATH = 100
_PEERS_REFRESH_SECONDS = 1.0
# What one datagram carries at most: the receiver reads 4096 bytes at a time.
_MAX_DATAGRAM = 4000
_names = itertools.count()


class SqliteFanout:
    """Committed events, carried between the processes that share one SQLite file.

    Each member binds a unix datagram socket in a directory next to the database (0700, like
    the data dir), named by its pid; after a commit it sends the events to every other socket
    there. Chosen over polling a change counter (`PRAGMA data_version`), which says only that
    *something* changed: every waiter would then re-read its job on every commit anywhere.
    Datagrams name the job, cost a few microseconds per peer, and nothing while idle. A send
    never blocks: when a peer's buffer is full the event is dropped and that peer's fallback
    poll covers it; a socket whose process died (connection refused) is removed.
    """

    def __init__(self, directory: Path, bus: LocalBus) -> None:
        self.directory = directory
        self._bus = bus
        self._name = f"{os.getpid()}-{next(_names)}"
        self._path = directory / self._name
        self._recv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()  # left by a dead process that had our pid
        self._recv.bind(str(self._path))
        self._send = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._send.setblocking(False)
        self._held: list[str] = []
        self._held_lock = threading.Lock()
        self._peers: list[str] = []
        self._peers_seen: tuple[int, float] = (-1, 0.0)
        self._closed = False
        self._thread = threading.Thread(target=self._receive, name="sqlite-fanout", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    @classmethod
    def join(cls, database: Path, bus: LocalBus) -> SqliteFanout | None:
        """Make `bus` a member of the fan-out of the SQLite file `database` (None where unix
        sockets are unavailable)."""
        if not hasattr(socket, "AF_UNIX"):
            return None
        try:
            fanout = cls(_fanout_dir(database), bus)
        except OSError as exc:
            log.warning("no cross-process wake-ups on %s (%s): waiters poll", database, exc)
            return None
        bus.forward = fanout.send
        bus.flush_forwarded = fanout.flush
        return fanout

    def send(self, kind: str, job_id: str) -> None:
        """Hold the event for the next `flush` (after the transaction's last event)."""
        with self._held_lock:
            self._held.append(f"{kind}:{job_id}")

    def flush(self) -> None:
        """Send the held events: as few datagrams as fit (a batch of submits makes one event
        per job; a sendto per event and peer cost ~8% of a busy API process)."""
        with self._held_lock:
            held, self._held = self._held, []
        if self._closed or not held:
            return
        payload = ""
        for line in held:
            if payload and len(payload) + 1 + len(line) > _MAX_DATAGRAM:
                self._send_to_peers(payload.encode())
                payload = ""
            payload = f"{payload}\n{line}" if payload else line
        self._send_to_peers(payload.encode())

    def _send_to_peers(self, payload: bytes) -> None:
        for peer in self._current_peers():
            try:
                self._send.sendto(payload, str(self.directory / peer))
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(OSError):
                    (self.directory / peer).unlink()  # its process is gone
                self._peers_seen = (-1, 0.0)
            except OSError:  # full buffer (BlockingIOError) and the like: the peer polls
                pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._path.unlink()
        # shutdown() wakes the thread blocked in recv(); close() alone would not.
        with contextlib.suppress(OSError):
            self._recv.shutdown(socket.SHUT_RDWR)
        self._recv.close()
        self._send.close()

    def _current_peers(self) -> list[str]:
        """The other members, listed again when the directory changed. Also every second:
        a directory's mtime is coarse (a few ms), so a member that joined in the same tick as
        the last listing would otherwise be missed until the next change."""
        try:
            mtime = os.stat(self.directory).st_mtime_ns
        except OSError:
            return []
        now = time.monotonic()
        seen_mtime, seen_at = self._peers_seen
        if mtime != seen_mtime or now - seen_at > _PEERS_REFRESH_SECONDS:
            with contextlib.suppress(OSError):
                self._peers = [p for p in os.listdir(self.directory) if p != self._name]
            self._peers_seen = (mtime, now)
        return self._peers

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self._recv.recv(4096)
            except OSError:
                return
            if not data:
                if self._closed:
                    return
                continue
            for line in data.decode(errors="replace").split("\n"):
                kind, _, job_id = line.partition(":")
                self._bus.deliver(kind, job_id)


def _fanout_dir(database: Path) -> Path:
    """`<database>-wake/`, or a private directory under the temp dir when that path is too
    long for a unix socket name."""
    directory = database.resolve().parent / f"{database.name}-wake"
    if len(str(directory).encode()) + 24 > _MAX_SOCKET_PATH:
        digest = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
        directory = Path(tempfile.gettempdir()) / f"auraserve-{os.getuid()}-{digest}"
    directory.mkdir(mode=0o700, exist_ok=True)
    if directory.stat().st_uid != os.getuid():
        raise OSError(f"{directory} belongs to another user")
    return directory


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
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


def _on_begin(conn: Connection) -> None:
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
