"""What a `Database` carries besides its engine: transition hooks and caches, per instance."""

from __future__ import annotations

import os
import sqlite3
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, create_engine, event, text
from sqlalchemy.exc import DBAPIError

from auraserve.config import Settings
from auraserve.core.jobs import Job, JobStatus
from auraserve.core.presets import default_presets
from auraserve.core.request import build_request
from auraserve.errors import StoreUnavailable
from auraserve.store import db as db_module
from auraserve.store import jobs, keys
from auraserve.store.db import Database, database_of, is_unavailable
from tests.conftest import BACKEND

PRESET = default_presets()["auraflow-v0-3-512"]
MODEL = "auraflow-v0-3-512"


def _submit(db: Database, account_id: str) -> jobs.Submission:
    req = build_request({"prompt": "p"}, model=MODEL, preset=PRESET)
    return jobs.submit(
        db,
        account_id=account_id,
        request=req,
        price=req.price(PRESET),
        max_queued=10,
        max_attempts=1,
    )


def test_hooks_run_in_the_transition_of_their_own_database_only(
    db: Database, tmp_path: Path
) -> None:
    seen: list[tuple[str, JobStatus]] = []

    def hook(conn: Connection, job: Job) -> None:
        assert database_of(conn) is db  # inside the status change's transaction
        seen.append((job.id, job.status))

    db.on_transition(hook)
    db.on_transition(hook)  # registering twice runs it once
    # (the other one records changes for the committed-transition hooks: metrics)
    assert db.transition_hooks.count(hook) == 1
    acct = keys.create_account(db, "a", credits=1000)
    sub = _submit(db, acct.account_id)
    [claimed] = jobs.claim(db, worker_id="w", models=[MODEL], max_images=1, lease_seconds=30)
    jobs.complete(db, worker_id="w", job_id=claimed.id, output={}, engine_seconds=0.1)
    assert seen == [
        (sub.job.id, JobStatus.QUEUED),
        (sub.job.id, JobStatus.PROCESSING),
        (sub.job.id, JobStatus.COMPLETED),
    ]

    other = Database(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        other.migrate()
        assert hook not in other.transition_hooks
        _submit(other, keys.create_account(other, "b", credits=1000).account_id)
        assert len(seen) == 3
    finally:
        other.dispose()


def test_a_failing_hook_rolls_back_the_status_change(db: Database) -> None:
    def hook(conn: Connection, job: Job) -> None:
        raise RuntimeError("no")

    acct = keys.create_account(db, "a", credits=1000)
    db.on_transition(hook)
    with pytest.raises(RuntimeError):
        _submit(db, acct.account_id)
    assert jobs.count_active(db, acct.account_id) == 0


def test_connections_name_their_database(db: Database) -> None:
    with db.read() as conn:
        assert database_of(conn) is db
    with db.write() as conn:
        assert database_of(conn) is db
    foreign = create_engine("sqlite://")
    with foreign.connect() as conn, pytest.raises(RuntimeError, match="not opened by"):
        database_of(conn)
    foreign.dispose()


def test_revoking_a_key_clears_this_databases_auth_cache(db: Database) -> None:
    created = keys.create_account(db, "a", credits=1)
    assert keys.authenticate(db, created.key) is not None
    assert len(db.auth_cache) == 1  # remembered for AUTH_CACHE_TTL
    assert keys.revoke_key(db, created.key_id)
    assert len(db.auth_cache) == 0
    assert keys.authenticate(db, created.key) is None


def test_cached_account_answers_only_keys_verified_within_the_ttl(db: Database) -> None:
    created = keys.create_account(db, "a", credits=1)
    assert keys.cached_account(db, created.key) is None  # never verified: ask the database
    account = keys.authenticate(db, created.key)
    assert account is not None
    assert keys.cached_account(db, created.key) == account
    assert keys.cached_account(db, created.key + "x") is None
    assert keys.revoke_key(db, created.key_id)
    assert keys.cached_account(db, created.key) is None


def test_a_revocation_elsewhere_takes_effect_within_the_ttl(settings: Settings) -> None:
    url = settings.resolved_database_url
    server = Database(url, auth_cache_ttl=0.3)
    cli = Database(url)
    try:
        server.migrate()
        created = keys.create_account(server, "a", credits=1)
        assert keys.authenticate(server, created.key) is not None
        assert keys.revoke_key(cli, created.key_id)
        assert keys.authenticate(server, created.key) is not None  # cached, within the TTL
        time.sleep(0.35)
        assert keys.authenticate(server, created.key) is None
    finally:
        server.dispose()
        cli.dispose()


def _position(db: Database, job_id: str) -> int | None:
    job = jobs.get(db, job_id)
    assert job is not None
    return job.queue_position


def test_queue_positions_are_cached_per_database_for_the_ttl(settings: Settings) -> None:
    db = Database(settings.resolved_database_url, position_ttl=0.3)
    try:
        db.migrate()
        acct = keys.create_account(db, "a", credits=10_000)
        first, second = _submit(db, acct.account_id), _submit(db, acct.account_id)
        assert _position(db, second.job.id) == 1
        assert db.positions.get(second.job.id) == 1
        [claimed] = jobs.claim(db, worker_id="w", models=[MODEL], max_images=1, lease_seconds=30)
        assert claimed.id == first.job.id
        assert _position(db, second.job.id) == 1  # still the cached answer
        time.sleep(0.35)
        assert _position(db, second.job.id) == 0
    finally:
        db.dispose()


def test_committed_hooks_see_committed_changes_only(db: Database) -> None:
    committed: list[JobStatus] = []
    db.on_committed_transition(lambda job: committed.append(job.status))
    acct = keys.create_account(db, "a", credits=1000)
    sub = _submit(db, acct.account_id)
    assert committed == [JobStatus.QUEUED]

    def refuse(conn: Connection, job: Job) -> None:
        raise RuntimeError("rolled back")

    db.on_transition(refuse)
    with pytest.raises(RuntimeError):
        jobs.claim(db, worker_id="w", models=[MODEL], max_images=1, lease_seconds=30)
    assert committed == [JobStatus.QUEUED]  # the rolled-back claim was never reported
    assert jobs.get(db, sub.job.id).status == JobStatus.QUEUED  # type: ignore[union-attr]


def test_a_failing_committed_hook_does_not_undo_the_change(db: Database) -> None:
    def broken(job: Job) -> None:
        raise RuntimeError("metrics backend gone")

    db.on_committed_transition(broken)
    acct = keys.create_account(db, "a", credits=1000)
    sub = _submit(db, acct.account_id)
    assert jobs.get(db, sub.job.id) is not None


def test_an_unreachable_database_raises_store_unavailable(tmp_path: Path) -> None:
    # Nothing listens on port 1: every connection is refused, as with a stopped server.
    dead = Database("postgresql+psycopg://127.0.0.1:1/none")
    try:
        with pytest.raises(StoreUnavailable) as caught, dead.read():
            pass
        assert is_unavailable(caught.value.__cause__)  # type: ignore[arg-type]
        with pytest.raises(StoreUnavailable), dead.write():
            pass
        with pytest.raises(StoreUnavailable):
            dead.schema_is_current()  # not "a new store, migrate it"
    finally:
        dead.dispose()


def test_a_wrong_statement_is_not_an_outage(db: Database) -> None:
    with pytest.raises(DBAPIError) as caught, db.read() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))
    assert not is_unavailable(caught.value)


# --- SQLite: writers of different processes take turns on a lock file -----------------------

if sys.platform != "win32":
    import fcntl

needs_flock = pytest.mark.skipif(sys.platform == "win32", reason="Windows has no flock")


def _sqlite(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'store.db'}")
    database.migrate()
    return database


def _held_elsewhere(path: Path) -> bool:
    """Whether someone holds the flock on `path`: asked through an open file of our own, which
    flock treats like another process's."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock if we got it
    return False


@needs_flock
def test_sqlite_writes_hold_a_private_lock_file_for_the_transaction_only(tmp_path: Path) -> None:
    db = _sqlite(tmp_path)
    try:
        lock = db.writer_file_lock
        assert lock is not None and lock.path == tmp_path / "store.db.write-lock"
        assert stat.S_IMODE(lock.path.stat().st_mode) == 0o600
        with db.write() as conn:
            conn.execute(text("SELECT 1"))
            assert _held_elsewhere(lock.path)
        assert not _held_elsewhere(lock.path)
        with pytest.raises(RuntimeError), db.write():
            raise RuntimeError("rolled back")
        assert not _held_elsewhere(lock.path)  # released on the way out of a failure too
        with db.read():
            assert not _held_elsewhere(lock.path)  # readers never take it
    finally:
        db.dispose()


@needs_flock
def test_a_sqlite_writer_waits_for_another_process_and_goes_when_it_releases(
    tmp_path: Path,
) -> None:
    db = _sqlite(tmp_path)
    assert db.writer_file_lock is not None
    other = os.open(db.writer_file_lock.path, os.O_RDWR)  # plays the other process
    fcntl.flock(other, fcntl.LOCK_EX)
    done = threading.Event()

    def writer() -> None:
        with db.write() as conn:
            conn.execute(text("SELECT 1"))
        done.set()

    thread = threading.Thread(target=writer)
    try:
        thread.start()
        assert not done.wait(0.3)  # it waits on the lock file, not past it
        fcntl.flock(other, fcntl.LOCK_UN)
        assert done.wait(2.0)
    finally:
        os.close(other)
        thread.join()
        db.dispose()


@needs_flock
def test_a_writer_outside_the_lock_file_still_makes_writes_unavailable_not_errors(
    tmp_path: Path,
) -> None:
    """Tools that do not take the lock file (the sqlite3 shell) meet SQLite's busy handler:
    past busy_timeout the write is a 503 (StoreUnavailable), and the lock file is let go."""
    db = _sqlite(tmp_path)
    db.engine.dispose()
    event.listen(db.engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA busy_timeout=50"))
    shell = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    try:
        shell.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable), db.write():
            pass
        assert db.writer_file_lock is not None
        assert not _held_elsewhere(db.writer_file_lock.path)
        shell.execute("ROLLBACK")
        with db.write() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        shell.close()
        db.dispose()


@needs_flock
def test_a_forked_child_locks_through_its_own_open_file(tmp_path: Path) -> None:
    """A child that kept its parent's descriptor would share the parent's lock (flock belongs
    to the open file) instead of excluding it."""
    db = _sqlite(tmp_path)
    lock = db.writer_file_lock
    assert lock is not None
    parent_fd = lock.fileno()
    assert parent_fd is not None
    locked_r, locked_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: hold the lock until told to let go
        try:
            with lock.held():
                os.write(locked_w, b"1")
                os.read(go_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(locked_r, 1) == b"1"
        with pytest.raises(BlockingIOError):
            fcntl.flock(parent_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.write(go_w, b"1")
        os.waitpid(pid, 0)
        for fd in (locked_r, locked_w, go_r, go_w):
            os.close(fd)
    assert not _held_elsewhere(lock.path)
    db.dispose()


# --- PostgreSQL: pooled connections are pinged only after sitting idle -----------------------

needs_postgresql = pytest.mark.skipif(
    BACKEND != "postgresql", reason="connection pinging: PostgreSQL only"
)


@needs_postgresql
def test_only_connections_idle_for_a_while_are_pinged(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings: list[object] = []
    real_ping = db.engine.dialect.do_ping

    def counting_ping(dbapi_connection: Any) -> bool:
        pings.append(dbapi_connection)
        return real_ping(dbapi_connection)

    monkeypatch.setattr(db.engine.dialect, "do_ping", counting_ping)
    for _ in range(3):  # a new connection, then one just used: no round trip spent on pings
        with db.read() as conn:
            conn.execute(text("SELECT 1"))
    assert pings == []
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE_SECONDS", 0.0)
    with db.read() as conn:
        conn.execute(text("SELECT 1"))
    assert len(pings) == 1


@needs_postgresql
def test_an_idle_connection_that_died_is_replaced_before_use(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    with db.read() as conn:
        backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    admin = create_engine(db.engine.url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
    finally:
        admin.dispose()
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE_SECONDS", 0.0)  # as if it sat idle
    with db.read() as conn:  # the dead one fails its ping and is replaced: no error
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != backend
    with db.write() as conn:
        conn.execute(text("SELECT 1"))
