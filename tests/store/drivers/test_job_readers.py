"""The status poll's read path (each driver's `JobReader`) against the store's own read
(store.jobs.get): the same Job for every status, the same tenant scoping, the same queue
positions; on PostgreSQL, a broken connection is retried and an unreachable database is a
quick StoreUnavailable that heals by itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from auraserve.core.jobs import Job, JobStatus
from auraserve.core.request import GenerationRequest
from auraserve.errors import StoreUnavailable
from auraserve.store import jobs, keys
from auraserve.store import media as media_rows
from auraserve.store.db import Store
from auraserve.store.drivers.base import JobReader
from auraserve.store.drivers.postgresql import PG_CHECKOUT_TIMEOUT, PgJobReader
from auraserve.store.drivers.sqlite import SqliteJobReader
from auraserve.store.events import JOB
from auraserve.store.reads import QueuePositions
from tests.conftest import BACKEND, free_port
from tests.store_jobs import MODEL, submit_job, submit_one

pg_only = pytest.mark.skipif(BACKEND != "postgresql", reason="PostgreSQL connections")


@asynccontextmanager
async def reader_of(db: Store) -> AsyncIterator[JobReader]:
    reader = db.driver.job_reader(db.positions, db.bus)
    try:
        yield reader
    finally:
        await reader.aclose()


async def _both(reader: JobReader, db: Store, job_id: str, account_id: str) -> Job | None:
    """The reader's answer, checked against `jobs.get`, each counting queue positions itself
    (the shared cache is emptied before each)."""
    db.positions.clear()
    fast = await reader.get(job_id, account_id=account_id)
    db.positions.clear()
    slow = jobs.get(db, job_id, account_id=account_id)
    assert fast == slow
    if slow is not None:
        assert fast is not None
        assert fast.queue_position == slow.queue_position  # not part of Job equality
    return fast


async def _position(reader: JobReader, db: Store, job_id: str, account_id: str) -> int | None:
    job = await _both(reader, db, job_id, account_id)
    assert job is not None
    return job.queue_position


async def test_every_status_reads_as_jobs_get_reads_it(db: Store) -> None:
    account = keys.create_account(db, "a", credits=10**6).account_id
    running, done, first, second = (submit_job(db, account) for _ in range(4))
    claimed = jobs.claim(db, worker_id="w", models=[MODEL], max_images=1, lease_seconds=30)
    assert [j.id for j in claimed] == [running]
    jobs.report_progress(
        db, worker_id="w", job_ids=[running], step=3, total=25, lease_seconds=30, log="step 3"
    )
    jobs.claim(db, worker_id="w2", models=[MODEL], max_images=1, lease_seconds=30)
    jobs.complete(
        db,
        worker_id="w2",
        job_id=done,
        output={"media": ["x.png"], "media_type": "image/png", "seeds": [1]},
        engine_seconds=0.5,
    )
    async with reader_of(db) as reader:
        seen = {}
        for job_id in (running, done, first, second):
            job = await _both(reader, db, job_id, account)
            assert job is not None
            seen[job_id] = job
    assert seen[running].status == JobStatus.PROCESSING and seen[running].logs
    assert seen[done].status == JobStatus.COMPLETED and seen[done].output is not None
    assert [seen[first].queue_position, seen[second].queue_position] == [0, 1]


async def test_queue_positions_follow_priority_and_share_the_store_cache(db: Store) -> None:
    account = keys.create_account(db, "a", credits=10**6).account_id
    ids = [submit_job(db, account) for _ in range(3)]
    urgent = submit_one(
        db,
        account_id=account,
        request=seen_request(db, ids[0]),
        price=1,
        max_queued=100,
        max_attempts=1,
        priority=-1,
    ).job.id
    async with reader_of(db) as reader:
        assert [await _position(reader, db, i, account) for i in ids] == [1, 2, 3]
        assert await _position(reader, db, urgent, account) == 0
        # One cache with jobs.queue_position_in: a position counted by either is reused.
        db.positions.clear()
        db.positions.put(ids[2], 42)
        cached = await reader.get(ids[2], account_id=account)
        assert cached is not None and cached.queue_position == 42
        db.positions.clear()
        await reader.get(ids[1], account_id=account)
        assert db.positions.get(ids[1]) == 2


def seen_request(db: Store, job_id: str) -> GenerationRequest:
    job = jobs.get(db, job_id)
    assert job is not None
    return job.request


async def test_another_accounts_job_and_a_missing_id_read_as_none(db: Store) -> None:
    owner = keys.create_account(db, "owner", credits=10**6).account_id
    other = keys.create_account(db, "other", credits=10**6).account_id
    job_id = submit_job(db, owner)
    async with reader_of(db) as reader:
        assert await _both(reader, db, job_id, other) is None
        assert await _both(reader, db, "0" * 36, owner) is None
        assert await _both(reader, db, job_id, owner) is not None


async def test_the_reader_serves_again_after_close(db: Store) -> None:
    account = keys.create_account(db, "a", credits=10**6).account_id
    job_id = submit_job(db, account)
    async with reader_of(db) as reader:
        assert await reader.get(job_id, account_id=account) is not None
        await reader.aclose()
        reader.close()
        assert await reader.get(job_id, account_id=account) is not None


@pytest.mark.skipif(BACKEND != "sqlite", reason="SQLite connections")
async def test_sqlite_reads_on_a_read_only_connection_of_this_thread(db: Store) -> None:
    account = keys.create_account(db, "a", credits=10**6).account_id
    job_id = submit_job(db, account)
    async with reader_of(db) as reader:
        assert isinstance(reader, SqliteJobReader)
        assert await reader.get(job_id, account_id=account) is not None
        conn = reader._connection()
        assert conn.execute("PRAGMA query_only").fetchone() == (1,)
        assert not conn.in_transaction  # no snapshot held between polls (WAL checkpoints)
        assert reader._connection() is conn


# --- PostgreSQL: broken connections and outages ------------------------------------------------


def _terminate_other_backends(database_url: str) -> int:
    admin = create_engine(
        make_url(database_url).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT"
    )
    try:
        with admin.connect() as conn:
            return len(
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).all()
            )
    finally:
        admin.dispose()


@pg_only
async def test_reads_survive_terminated_connections(db: Store) -> None:
    account = keys.create_account(db, "a", credits=10**6).account_id
    job_id = submit_job(db, account)
    async with reader_of(db) as reader:
        # Concurrent reads grow the pool to several connections; all of them are then cut.
        await asyncio.gather(*(reader.get(job_id, account_id=account) for _ in range(16)))
        assert _terminate_other_backends(db.url) >= 2
        await asyncio.sleep(0.1)  # the terminations reach the client sockets
        for _ in range(6):  # every dead pooled connection in turn: each read is retried
            assert await reader.get(job_id, account_id=account) is not None
        assert _terminate_other_backends(db.url) >= 1
        await asyncio.sleep(0.1)
        found = await asyncio.gather(*(reader.get(job_id, account_id=account) for _ in range(16)))
        assert all(job is not None for job in found)


@pg_only
async def test_an_unreachable_database_is_a_quick_store_unavailable() -> None:
    closed = f"postgresql://127.0.0.1:{free_port()}/nowhere"
    reader = PgJobReader(closed, QueuePositions(ttl=1.0))
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await reader.get("0" * 36, account_id="a")
        # The first read waits once for the pool; then each read fails at once.
        assert time.monotonic() - started < PG_CHECKOUT_TIMEOUT + 1.5
        started = time.monotonic()
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                await reader.get("0" * 36, account_id="a")
        assert time.monotonic() - started < 1.0
    finally:
        await reader.aclose()


@pg_only
async def test_reads_recover_as_soon_as_the_database_returns(db: Store) -> None:
    from tests.api.test_db_outage import TcpProxy

    account = keys.create_account(db, "a", credits=10**6).account_id
    job_id = submit_job(db, account)
    target = make_url(db.url)
    with TcpProxy(target.host or "127.0.0.1", target.port or 5432) as proxy:
        proxied = target.set(host="127.0.0.1", port=proxy.port).render_as_string(False)
        reader = PgJobReader(proxied, db.positions)
        try:
            assert await reader.get(job_id, account_id=account) is not None
            proxy.stop()
            for _ in range(3):
                with pytest.raises(StoreUnavailable):
                    await reader.get(job_id, account_id=account)
            proxy.start()
            # No waiting out the pool's reconnection back-off: the next read works.
            started = time.monotonic()
            assert await reader.get(job_id, account_id=account) is not None
            assert await reader.get(job_id, account_id=account) is not None
            assert time.monotonic() - started < 1.0
        finally:
            await reader.aclose()


# --- PostgreSQL: the per-process row cache -----------------------------------------------------

# Far beyond every deadline below: a change is seen in time only because its event dropped the
# cached row, never because the row expired.
_LONG_TTL = 60.0


async def _until(check: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the deadline"
        await asyncio.sleep(0.01)


async def _listening(db: Store) -> Store:
    db.start_listener()
    await _until(lambda: db.bus.listening, timeout=5.0)
    return db


async def _poll_until(
    reader: JobReader, job_id: str, account_id: str, check: Callable[[Job], bool]
) -> Job:
    """Poll as a client does until `check` holds (2 s deadline)."""
    deadline = time.monotonic() + 2.0
    while True:
        job = await reader.get(job_id, account_id=account_id)
        assert job is not None
        if check(job):
            return job
        assert time.monotonic() < deadline, f"still {job.status} {job.progress_step}"
        await asyncio.sleep(0.01)


async def _cached(reader: PgJobReader, job_id: str, account_id: str) -> Job:
    """Poll until the row is cached (a poll that an event overlapped does not cache it); the
    job as the cache serves it."""
    rows = reader.rows
    assert rows is not None
    deadline = time.monotonic() + 2.0
    while job_id not in rows:
        assert time.monotonic() < deadline, "never cached"
        await reader.get(job_id, account_id=account_id)
    job = await reader.get(job_id, account_id=account_id)
    assert job is not None
    return job


@asynccontextmanager
async def cached_reader(db: Store, url: str | None = None) -> AsyncIterator[PgJobReader]:
    """A reader of `db` (through `url` if given) whose cache hears `db`'s listening bus."""
    await _listening(db)
    reader = PgJobReader(url or db.url, db.positions, bus=db.bus, row_cache_ttl=_LONG_TTL)
    try:
        yield reader
    finally:
        await reader.aclose()


@pytest.fixture
def other_process(db: Store) -> Iterator[Store]:
    """The same store through its own engine and listener, as another process has them."""
    other = Store(db.url)
    other.start_listener()
    yield other
    other.dispose()


def _terminate(database_url: str, pid: int) -> None:
    admin = create_engine(
        make_url(database_url).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT"
    )
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        admin.dispose()


@pg_only
async def test_changes_made_by_another_process_reach_the_next_poll(
    db: Store, other_process: Store
) -> None:
    account = keys.create_account(db, "a", credits=10**6).account_id
    job_id = submit_job(db, account)
    async with cached_reader(db) as reader:
        assert (await _cached(reader, job_id, account)).status == JobStatus.QUEUED
        jobs.claim(other_process, worker_id="w", models=[MODEL], max_images=1, lease_seconds=30)
        await _poll_until(reader, job_id, account, lambda j: j.status == JobStatus.PROCESSING)

        await _cached(reader, job_id, account)
        jobs.report_progress(
            other_process, worker_id="w", job_ids=[job_id], step=7, total=25, lease_seconds=30
        )
        await _poll_until(reader, job_id, account, lambda j: j.progress_step == 7)

        await _cached(reader, job_id, account)
        cancelled = jobs.cancel(other_process, job_id, account_id=account)
        assert cancelled is not None and cancelled.outcome == "requested"
        job = await _poll_until(reader, job_id, account, lambda j: j.cancel_requested)
        assert job == jobs.get(db, job_id, account_id=account)


@pg_only
async def test_media_retention_by_another_process_reaches_the_next_poll(
    db: Store, other_process: Store
) -> None:
    account = keys.create_account(db, "a", credits=10**6).account_id
    job_id = submit_job(db, account)
    jobs.claim(db, worker_id="w", models=[MODEL], max_images=1, lease_seconds=30)
    output = {"media": ["x.png"], "media_type": "image/png", "seeds": [1]}
    jobs.complete(db, worker_id="w", job_id=job_id, output=output, engine_seconds=0.5)
    async with cached_reader(db) as reader:
        await _cached(reader, job_id, account)
        now = time.time()
        expired = media_rows.expire_older_than(
            other_process, cutoff=now + 1, retention=60.0, now=now
        )
        assert expired.job_ids == [job_id]
        job = await _poll_until(reader, job_id, account, lambda j: "expired_at" in (j.output or {}))
        assert job == jobs.get(db, job_id, account_id=account)


@pg_only
async def test_this_process_reads_its_own_commits_at_once(db: Store) -> None:
    account = keys.create_account(db, "a", credits=10**6).account_id
    job_id = submit_job(db, account)
    jobs.claim(db, worker_id="w", models=[MODEL], max_images=1, lease_seconds=30)
    async with cached_reader(db) as reader:
        await _cached(reader, job_id, account)
        jobs.report_progress(
            db, worker_id="w", job_ids=[job_id], step=3, total=25, lease_seconds=30
        )
        # The commit's own event dropped the row before report_progress returned.
        job = await reader.get(job_id, account_id=account)
        assert job is not None and job.progress_step == 3


@pg_only
async def test_a_repeated_poll_of_an_unchanged_job_makes_no_round_trip(db: Store) -> None:
    from tests.api.test_db_outage import TcpProxy

    account = keys.create_account(db, "a", credits=10**6).account_id
    other = keys.create_account(db, "other", credits=10**6).account_id
    job_id, uncached = submit_job(db, account), submit_job(db, account)
    jobs.claim(db, worker_id="w", models=[MODEL], max_images=1, lease_seconds=30)
    target = make_url(db.url)
    with TcpProxy(target.host or "127.0.0.1", target.port or 5432) as proxy:
        proxied = target.set(host="127.0.0.1", port=proxy.port).render_as_string(False)
        # The reader reaches the database only through the proxy; the listener directly.
        async with cached_reader(db, proxied) as reader:
            first = await _cached(reader, job_id, account)
            assert first.status == JobStatus.PROCESSING
            proxy.stop()
            # The reader cannot reach the database now, as a job it has not cached shows ...
            with pytest.raises(StoreUnavailable):
                await reader.get(uncached, account_id=account)
            # ... yet the cached one is served, the same each time.
            for _ in range(50):
                job = await reader.get(job_id, account_id=account)
                assert job == first and job.progress_step == first.progress_step
            # Only to the account that owns it: any other reads the database.
            with pytest.raises(StoreUnavailable):
                await reader.get(job_id, account_id=other)


@pg_only
async def test_no_caching_while_the_listener_is_disconnected(
    db: Store, other_process: Store
) -> None:
    account = keys.create_account(db, "a", credits=10**6).account_id
    job_id = submit_job(db, account)
    async with cached_reader(db) as reader:
        rows = reader.rows
        assert rows is not None
        await _cached(reader, job_id, account)
        listener = db._events
        assert listener is not None and listener.backend_pid is not None
        _terminate(db.url, listener.backend_pid)
        await _until(lambda: not db.bus.listening)
        assert len(rows) == 0  # emptied on the loss
        # A change nobody here hears about: the next poll reads it, and nothing is cached.
        jobs.claim(other_process, worker_id="w", models=[MODEL], max_images=1, lease_seconds=30)
        assert not db.bus.listening  # the listener waits a second before reconnecting
        job = await reader.get(job_id, account_id=account)
        assert job is not None and job.status == JobStatus.PROCESSING
        assert job_id not in rows
        # Listening again: rows are cached again.
        await _until(lambda: db.bus.listening, timeout=5.0)
        assert (await _cached(reader, job_id, account)).status == JobStatus.PROCESSING


@pg_only
async def test_an_event_during_the_read_keeps_its_row_out_of_the_cache(
    db: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = keys.create_account(db, "a", credits=10**6).account_id
    job_id = submit_job(db, account)
    async with cached_reader(db) as reader:
        rows = reader.rows
        assert rows is not None
        read = reader._lookup
        event_for: list[str] = []

        async def read_then_event(conn: Any, job: str, acct: str) -> Any:
            found = await read(conn, job, acct)
            # A change committed after this row was read: its event arrives before the row
            # is put in the cache.
            for changed in event_for:
                db.bus.deliver(JOB, changed)
            return found

        monkeypatch.setattr(reader, "_lookup", read_then_event)
        for changed in (job_id, "another job"):  # the counter is global: any job's event
            event_for[:] = [changed]
            assert await reader.get(job_id, account_id=account) is not None
            assert job_id not in rows
        event_for.clear()
        assert await reader.get(job_id, account_id=account) is not None
        assert job_id in rows


@pg_only
async def test_without_a_listener_nothing_is_cached(db: Store) -> None:
    account = keys.create_account(db, "a", credits=10**6).account_id
    job_id = submit_job(db, account)
    async with reader_of(db) as reader:  # as a CLI process: the Store never listens
        assert isinstance(reader, PgJobReader) and reader.rows is not None
        for _ in range(3):
            assert await reader.get(job_id, account_id=account) is not None
        assert len(reader.rows) == 0
