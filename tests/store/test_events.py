"""The SQLite fan-out: events committed through one `Store` wake waiters of another that
shares the file, as they would in another process (unix datagram sockets, real ones). The bus's
job-event subscriptions and listening state (what `store.job_reads`' row cache relies on), and
the events of bulk job updates."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from auraserve.store import jobs, keys
from auraserve.store import media as media_rows
from auraserve.store.db import Store
from auraserve.store.drivers.sqlite import SqliteFanout
from auraserve.store.events import JOB, WORK, LocalBus
from tests.conftest import BACKEND
from tests.store_jobs import MODEL, submit_job


def _join(db: Store) -> SqliteFanout | None:
    file = db.driver.local_file
    return SqliteFanout.join(file, db.bus) if file is not None else None


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Store, Store, list[SqliteFanout]]]:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    one, two = Store(url), Store(url)
    fanouts = [f for f in (_join(one), _join(two)) if f is not None]
    yield one, two, fanouts
    for fanout in fanouts:
        fanout.close()
    one.dispose()
    two.dispose()


def test_a_job_event_reaches_the_other_member(
    pair: tuple[Store, Store, list[SqliteFanout]],
) -> None:
    one, two, fanouts = pair
    assert len(fanouts) == 2

    async def scenario() -> float:
        with two.bus.watch("job-1") as changed:
            started = time.monotonic()
            one.bus.publish(JOB, "job-1")
            await asyncio.wait_for(changed.wait(), 2.0)
            return time.monotonic() - started

    assert asyncio.run(scenario()) < 1.0


def test_a_batch_of_events_reaches_the_other_member_whole(
    pair: tuple[Store, Store, list[SqliteFanout]],
) -> None:
    """A transaction's events go in as few datagrams as fit (several here: 300 events are
    over 4,000 bytes), and every one of them arrives."""
    one, two, _ = pair
    ids = [f"job-{i:04d}-{'x' * 20}" for i in range(300)]

    async def scenario() -> None:
        with contextlib.ExitStack() as stack:
            changed = [stack.enter_context(two.bus.watch(i)) for i in ids]
            with one.bus.batch():
                for job_id in ids:
                    one.bus.publish(JOB, job_id)
            await asyncio.wait_for(asyncio.gather(*(c.wait() for c in changed)), 2.0)

    asyncio.run(scenario())


def test_work_wakes_the_other_members_workers(
    pair: tuple[Store, Store, list[SqliteFanout]],
) -> None:
    one, two, _ = pair
    seen = two.bus.work_seq()
    one.bus.publish(WORK, "job-2")
    assert two.bus.wait_for_work(seen, timeout=2.0) != seen


def test_a_dead_members_socket_is_removed(
    pair: tuple[Store, Store, list[SqliteFanout]],
) -> None:
    one, _, fanouts = pair
    directory = fanouts[0].directory
    stale = directory / "999999999-0"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(stale))
    dead.close()  # the file stays, as after a SIGKILL
    time.sleep(0.01)
    fanouts[0]._peers_seen = (-1, 0.0)  # list the directory again now
    one.bus.publish(JOB, "job-3")
    assert not stale.exists()


def test_closing_leaves_the_directory(tmp_path: Path) -> None:
    db = Store(f"sqlite:///{tmp_path / 'alone.db'}")
    fanout = _join(db)
    assert fanout is not None
    assert [p.name for p in fanout.directory.iterdir()] != []
    fanout.close()
    assert list(fanout.directory.iterdir()) == []
    db.dispose()


def test_not_on_postgresql() -> None:
    """PostgreSQL has LISTEN/NOTIFY (its driver's PgListener) and no local file to fan out
    beside. No connection is made here."""
    db = Store("postgresql+psycopg://127.0.0.1:5432/test")
    assert db.driver.local_file is None and db.driver.hears_every_commit
    db.dispose()


def test_job_subscribers_hear_job_and_work_events_and_listening_changes() -> None:
    bus = LocalBus()
    heard: list[str | None] = []

    def failing(_job_id: str | None) -> None:
        raise RuntimeError("a broken subscriber")

    bus.on_job_event(failing)  # it fails: the others still hear, waiters still wake
    bus.on_job_event(heard.append)
    bus.deliver(JOB, "j1")
    bus.publish(WORK, "j2")
    bus.deliver("outbox", "x")  # not a job's event
    assert heard == ["j1", "j2"]
    assert not bus.listening
    bus.set_listening(True)
    assert bus.listening and heard[-1] is None
    heard.clear()
    bus.set_listening(False)
    assert not bus.listening and heard == [None]

    async def woken() -> None:
        with bus.watch("j3") as changed:
            bus.deliver(JOB, "j3")
            await asyncio.wait_for(changed.wait(), 1.0)

    asyncio.run(woken())


def test_media_retention_emits_an_event_per_job(db: Store) -> None:
    account = keys.create_account(db, "a", credits=10**6).account_id
    done = []
    for _ in range(3):
        job_id = submit_job(db, account)
        jobs.claim(db, worker_id="w", models=[MODEL], max_images=1, lease_seconds=30)
        output = {"media": [f"{job_id}.png"], "media_type": "image/png", "seeds": [1]}
        jobs.complete(db, worker_id="w", job_id=job_id, output=output, engine_seconds=0.1)
        done.append(job_id)
    heard: list[str | None] = []
    db.bus.on_job_event(heard.append)
    now = time.time()
    expired = media_rows.expire_older_than(db, cutoff=now + 1, retention=60.0, now=now)
    assert sorted(expired.job_ids) == sorted(done)
    assert sorted(j for j in heard if j is not None) == sorted(done)


@pytest.mark.skipif(BACKEND != "postgresql", reason="PostgreSQL's LISTEN")
def test_the_bus_listens_from_listen_until_the_listener_stops(db: Store) -> None:
    assert not db.bus.listening
    db.start_listener()
    deadline = time.monotonic() + 5.0
    while not db.bus.listening:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    listener = db._events
    assert listener is not None and listener.backend_pid is not None
    db.dispose()
    assert not db.bus.listening and listener.backend_pid is None
