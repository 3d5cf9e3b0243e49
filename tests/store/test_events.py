"""The SQLite fan-out: events committed through one `Database` wake waiters of another that
shares the file, as they would in another process (unix datagram sockets, real ones)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from auraserve.store.db import Database
from auraserve.store.events import JOB, WORK, SqliteFanout


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Database, Database, list[SqliteFanout]]]:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    one, two = Database(url), Database(url)
    fanouts = [f for f in (SqliteFanout.join(one), SqliteFanout.join(two)) if f is not None]
    yield one, two, fanouts
    for fanout in fanouts:
        fanout.close()
    one.dispose()
    two.dispose()


def test_a_job_event_reaches_the_other_member(
    pair: tuple[Database, Database, list[SqliteFanout]],
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


def test_work_wakes_the_other_members_workers(
    pair: tuple[Database, Database, list[SqliteFanout]],
) -> None:
    one, two, _ = pair
    seen = two.bus.work_seq()
    one.bus.publish(WORK, "job-2")
    assert two.bus.wait_for_work(seen, timeout=2.0) != seen


def test_a_dead_members_socket_is_removed(
    pair: tuple[Database, Database, list[SqliteFanout]],
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
    db = Database(f"sqlite:///{tmp_path / 'alone.db'}")
    fanout = SqliteFanout.join(db)
    assert fanout is not None
    assert [p.name for p in fanout.directory.iterdir()] != []
    fanout.close()
    assert list(fanout.directory.iterdir()) == []
    db.dispose()


def test_not_on_postgresql() -> None:
    """PostgreSQL has LISTEN/NOTIFY (store.events.PgListener). No connection is made here."""
    db = Database("postgresql+psycopg://127.0.0.1:5432/test")
    assert SqliteFanout.join(db) is None
    db.dispose()
