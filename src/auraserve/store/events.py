"""Wake-ups: tell workers that work arrived and tell waiters that a job changed.

Store functions record events inside their transaction (`emit_in`). They are delivered only
after the commit, so nobody wakes up to a row it cannot see yet. On PostgreSQL the event is
also sent with `pg_notify`, which PostgreSQL itself delivers at commit to every process that
listens (other API replicas and workers); a listener thread feeds those into this process's
bus. Waiters always re-read the store after waking and keep a short poll as a fallback, so a
lost notification costs latency, never correctness.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, text

log = logging.getLogger(__name__)

CHANNEL = "auraserve"
WORK = "work"  # a job became claimable
JOB = "job"  # a job's status, progress or cancel flag changed


class LocalBus:
    """In-process fan-out of events to threads (workers) and asyncio tasks (HTTP waiters)."""

    def __init__(self) -> None:
        self._work = threading.Condition()
        self._work_seq = 0
        self._lock = threading.Lock()
        self._job_waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = (
            defaultdict(set)
        )

    def publish(self, kind: str, job_id: str) -> None:
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

    def work_seq(self) -> int:
        with self._work:
            return self._work_seq

    def wait_for_work(self, seen: int, timeout: float) -> int:
        """Block until a WORK event newer than `seen` or the timeout; returns the new sequence."""
        with self._work:
            self._work.wait_for(lambda: self._work_seq != seen, timeout=timeout)
            return self._work_seq

    def wake_workers(self) -> None:
        self.publish(WORK, "")

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
    conn.info.setdefault("auraserve_events", []).append((kind, job_id))
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_notify(:c, :p)"), {"c": CHANNEL, "p": f"{kind}:{job_id}"})


def take_events(conn: Connection) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = conn.info.pop("auraserve_events", [])
    return events


class PgListener:
    """A thread that LISTENs on PostgreSQL and republishes notifications on the local bus."""

    def __init__(self, dsn: str, bus: LocalBus) -> None:
        self._dsn = dsn
        self._bus = bus
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    # Anything may have happened while we were not listening.
                    self._bus.wake_workers()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.25, stop_after=100):
                            kind, _, job_id = note.payload.partition(":")
                            self._bus.publish(kind, job_id)
            except Exception as exc:  # reconnect: the poll fallback covers the gap
                log.warning("PostgreSQL listener lost its connection (%s); reconnecting", exc)
                self._stop.wait(1.0)
