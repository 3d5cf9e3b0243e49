"""Wake-ups: tell workers that work arrived and tell waiters that a job changed.

Store functions record events inside their transaction (`emit_in`). They are delivered only
after the commit, so nobody wakes up to a row it cannot see yet. Other processes hear them
through the driver (`Driver.notify` and `Driver.join`: PostgreSQL's NOTIFY and a listener
thread; SQLite's datagram fan-out between the processes that share its file). Waiters always
re-read the store after waking and keep a short poll as a fallback, so a lost notification
costs latency, never correctness.

Every change of a job row emits a JOB or WORK event for that job in its transaction (`emit_in`,
`emit_each_in`): caches of job rows (`drivers.postgresql.JobRowCache`, whose module says how)
rely on it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager

from sqlalchemy import Connection

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
    """`emit_in` for each of `job_ids` (bulk updates). Other processes hear them at the
    commit (the driver's `notify`: `Store.write` sends the transaction's events before it)."""
    if not job_ids:
        return
    conn.info.setdefault("auraserve_events", []).extend((kind, job_id) for job_id in job_ids)


def unsent_events(conn: Connection) -> list[tuple[str, str]]:
    """The events recorded in the current transaction and not yet handed to the driver's
    `notify` (`Store.send_events`), now counted as handed over."""
    events: list[tuple[str, str]] = conn.info.get("auraserve_events", [])
    sent = conn.info.get("auraserve_sent", 0)
    conn.info["auraserve_sent"] = len(events)
    return events[sent:]


def take_events(conn: Connection) -> list[tuple[str, str]]:
    """The transaction's events, forgotten here (at its end)."""
    conn.info.pop("auraserve_sent", None)
    events: list[tuple[str, str]] = conn.info.pop("auraserve_events", [])
    return events
