"""Wake-ups: tell workers that work arrived and tell waiters that a job changed.

Store functions record events inside their transaction (`emit_in`). They are delivered only
after the commit, so nobody wakes up to a row it cannot see yet. On PostgreSQL the event is
also sent with `pg_notify`, which PostgreSQL itself delivers at commit to every process that
listens (other API replicas and workers); a listener thread feeds those into this process's
bus. SQLite has no NOTIFY: processes that share one SQLite file (`serve --api-processes N`)
join a datagram fan-out (`SqliteFanout`) that carries the same events between them. Waiters
always re-read the store after waking and keep a short poll as a fallback, so a lost
notification costs latency, never correctness.

Caches of job rows (`store.job_reads`) subscribe to the bus's job events (`on_job_event`) and
trust it only while it is `listening`: on PostgreSQL from the moment the listener's LISTEN is in
place until its connection is lost. Every change of a job row emits a JOB or WORK event for
that job in its transaction (`emit_in`, `emit_each_in` for many jobs).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import itertools
import logging
import os
import socket
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, text

if TYPE_CHECKING:
    from auraserve.store.db import Database

log = logging.getLogger(__name__)

CHANNEL = "auraserve"
WORK = "work"  # a job became claimable
JOB = "job"  # a job's status, progress or cancel flag changed

JobChanged = Callable[[str | None], None]
"""Told the id of a job that changed (a JOB or WORK event), or None when any job may have
changed unheard (the bus started or stopped listening)."""


class LocalBus:
    """In-process fan-out of events to threads (workers) and asyncio tasks (HTTP waiters)."""

    def __init__(self) -> None:
        self._work = threading.Condition()
        self._work_seq = 0
        self._lock = threading.Lock()
        self._job_waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = (
            defaultdict(set)
        )
        # Where this process's committed events also go (SqliteFanout: the other processes),
        # and what sends on whatever `forward` held back (one datagram for a transaction's
        # events rather than one per event).
        self.forward: Callable[[str, str], None] | None = None
        self.flush_forwarded: Callable[[], None] | None = None
        self._batching = threading.local()
        # Replaced whole under _lock, read without it: deliver() runs on every event.
        self._job_callbacks: tuple[JobChanged, ...] = ()
        self._listening = False

    def on_job_event(self, callback: JobChanged) -> None:
        """Call `callback(job_id)` for every JOB and WORK event delivered here, and
        `callback(None)` whenever `listening` changes. It runs on the delivering thread (a
        writer after its commit, the listener thread): it must be quick and thread-safe."""
        with self._lock:
            self._job_callbacks = (*self._job_callbacks, callback)

    @property
    def listening(self) -> bool:
        """True while every job change committed by any process reaches this bus (PostgreSQL:
        the listener's LISTEN is in place). Never on SQLite: its fan-out drops datagrams."""
        return self._listening

    def set_listening(self, listening: bool) -> None:
        """Set by the listener: True once LISTEN is in place, False when its connection is
        lost. Either way subscribers hear `None`: after a loss, changes may go unheard; and
        a read that began before LISTEN may have missed a change made before it."""
        self._listening = listening
        self._tell_job_callbacks(None)

    def publish(self, kind: str, job_id: str) -> None:
        """An event committed by this process: deliver it here, and forward it if joined
        (at the end of the `batch` it is published in, if any)."""
        self.deliver(kind, job_id)
        forward = self.forward
        if forward is not None:
            forward(kind, job_id)
        if not getattr(self._batching, "depth", 0):
            self._flush()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Events published in this thread meanwhile are forwarded together at the end (one
        transaction's events: one datagram per peer instead of one per event)."""
        self._batching.depth = getattr(self._batching, "depth", 0) + 1
        try:
            yield
        finally:
            self._batching.depth -= 1
            if not self._batching.depth:
                self._flush()

    def _flush(self) -> None:
        flush = self.flush_forwarded
        if flush is not None:
            flush()

    def deliver(self, kind: str, job_id: str) -> None:
        """Wake this process's waiters only (events that came from another process)."""
        if kind in (JOB, WORK):
            # Before any waiter wakes: whatever it reads next must not come from a cache.
            self._tell_job_callbacks(job_id)
        if kind == WORK:
            with self._work:
                self._work_seq += 1
                self._work.notify_all()
        with self._lock:
            waiters = list(self._job_waiters.get(job_id, ()))
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop closed while we held a reference
                pass

    def _tell_job_callbacks(self, job_id: str | None) -> None:
        for callback in self._job_callbacks:
            try:
                callback(job_id)
            except Exception:  # the commit is done: a failing subscriber must not undo it
                log.exception("a job-event subscriber failed")

    def work_seq(self) -> int:
        with self._work:
            return self._work_seq

    def wait_for_work(self, seen: int, timeout: float) -> int:
        """Block until a WORK event newer than `seen` or the timeout; returns the new sequence."""
        with self._work:
            self._work.wait_for(lambda: self._work_seq != seen, timeout=timeout)
            return self._work_seq

    def wake_workers(self) -> None:
        self.deliver(WORK, "")

    @contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An asyncio.Event set whenever `job_id` changes; clear it before re-reading."""
        loop = asyncio.get_running_loop()
        entry = (loop, asyncio.Event())
        with self._lock:
            self._job_waiters[job_id].add(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                waiters = self._job_waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(entry)
                    if not waiters:
                        del self._job_waiters[job_id]


def emit_in(conn: Connection, kind: str, job_id: str) -> None:
    """Record an event in the current transaction; delivered after commit."""
    emit_each_in(conn, kind, (job_id,))


def emit_each_in(conn: Connection, kind: str, job_ids: Collection[str]) -> None:
    """`emit_in` for each of `job_ids`, in one statement on PostgreSQL (bulk updates)."""
    if not job_ids:
        return
    conn.info.setdefault("auraserve_events", []).extend((kind, job_id) for job_id in job_ids)
    if conn.dialect.name == "postgresql":
        conn.execute(
            text("SELECT pg_notify(:c, p) FROM unnest(CAST(:ps AS text[])) AS p"),
            {"c": CHANNEL, "ps": [f"{kind}:{job_id}" for job_id in job_ids]},
        )


def take_events(conn: Connection) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = conn.info.pop("auraserve_events", [])
    return events


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

    def stop(self) -> None:
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
        import psycopg

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
    def join(cls, db: Database) -> SqliteFanout | None:
        """Make `db`'s bus a member of its SQLite file's fan-out (None on PostgreSQL, for an
        in-memory database, or where unix sockets are unavailable)."""
        if not db.is_sqlite or not hasattr(socket, "AF_UNIX"):
            return None
        name = db.url.split(":///", 1)[-1]
        if not name or name == ":memory:" or name.startswith("file:"):
            return None
        try:
            fanout = cls(_fanout_dir(Path(name)), db.bus)
        except OSError as exc:
            log.warning("no cross-process wake-ups on %s (%s): waiters poll", name, exc)
            return None
        db.bus.forward = fanout.send
        db.bus.flush_forwarded = fanout.flush
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
