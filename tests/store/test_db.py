"""What a `Store` carries besides its engine: transition hooks and caches, per instance."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.exc import DBAPIError

from auraserve.config import Settings
from auraserve.core.jobs import Job, JobStatus
from auraserve.core.presets import default_presets
from auraserve.core.request import build_request
from auraserve.errors import StoreUnavailable
from auraserve.store import jobs, keys
from auraserve.store.db import Store, store_of
from auraserve.store.submissions import Submitted
from tests.store_jobs import submit_one

PRESET = default_presets()["auraflow-v0-3-512"]
MODEL = "auraflow-v0-3-512"


def _submit(db: Store, account_id: str) -> Submitted:
    req = build_request({"prompt": "p"}, model=MODEL, preset=PRESET)
    return submit_one(
        db,
        account_id=account_id,
        request=req,
        price=req.price(PRESET),
        max_queued=10,
        max_attempts=1,
    )


def test_hooks_run_in_the_transition_of_their_own_database_only(db: Store, tmp_path: Path) -> None:
    seen: list[tuple[str, JobStatus]] = []

    def hook(conn: Connection, job: Job) -> None:
        assert store_of(conn) is db  # inside the status change's transaction
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

    other = Store(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        other.migrate()
        assert hook not in other.transition_hooks
        _submit(other, keys.create_account(other, "b", credits=1000).account_id)
        assert len(seen) == 3
    finally:
        other.dispose()


def test_a_failing_hook_rolls_back_the_status_change(db: Store) -> None:
    def hook(conn: Connection, job: Job) -> None:
        raise RuntimeError("no")

    acct = keys.create_account(db, "a", credits=1000)
    db.on_transition(hook)
    with pytest.raises(RuntimeError):
        _submit(db, acct.account_id)
    assert jobs.count_active(db, acct.account_id) == 0


def test_connections_name_their_database(db: Store) -> None:
    with db.read() as conn:
        assert store_of(conn) is db
    with db.write() as conn:
        assert store_of(conn) is db
    foreign = create_engine("sqlite://")
    with foreign.connect() as conn, pytest.raises(RuntimeError, match="not opened by"):
        store_of(conn)
    foreign.dispose()


def test_revoking_a_key_clears_this_databases_auth_cache(db: Store) -> None:
    created = keys.create_account(db, "a", credits=1)
    assert keys.authenticate(db, created.key) is not None
    assert len(db.auth_cache) == 1  # remembered for AUTH_CACHE_TTL
    assert keys.revoke_key(db, created.key_id)
    assert len(db.auth_cache) == 0
    assert keys.authenticate(db, created.key) is None


def test_cached_account_answers_only_keys_verified_within_the_ttl(db: Store) -> None:
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
    server = Store(url, auth_cache_ttl=0.3)
    cli = Store(url)
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


def _position(db: Store, job_id: str) -> int | None:
    job = jobs.get(db, job_id)
    assert job is not None
    return job.queue_position


def test_queue_positions_are_cached_per_database_for_the_ttl(settings: Settings) -> None:
    db = Store(settings.resolved_database_url, position_ttl=0.3)
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


def test_committed_hooks_see_committed_changes_only(db: Store) -> None:
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


def test_a_failing_committed_hook_does_not_undo_the_change(db: Store) -> None:
    def broken(job: Job) -> None:
        raise RuntimeError("metrics backend gone")

    db.on_committed_transition(broken)
    acct = keys.create_account(db, "a", credits=1000)
    sub = _submit(db, acct.account_id)
    assert jobs.get(db, sub.job.id) is not None


def test_an_unreachable_database_raises_store_unavailable(tmp_path: Path) -> None:
    # Nothing listens on port 1: every connection is refused, as with a stopped server.
    dead = Store("postgresql+psycopg://127.0.0.1:1/none")
    try:
        with pytest.raises(StoreUnavailable) as caught, dead.read():
            pass
        assert dead.is_unavailable(caught.value.__cause__)  # type: ignore[arg-type]
        with pytest.raises(StoreUnavailable), dead.write():
            pass
        with pytest.raises(StoreUnavailable):
            dead.schema_is_current()  # not "a new store, migrate it"
    finally:
        dead.dispose()


def test_a_wrong_statement_is_not_an_outage(db: Store) -> None:
    with pytest.raises(DBAPIError) as caught, db.read() as conn:
        conn.execute(text("SELECT * FROM no_such_table"))
    assert not db.is_unavailable(caught.value)
