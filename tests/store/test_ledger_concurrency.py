"""Money under concurrency: many simultaneous submits against a small balance."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import event, func, select

from auraserve.core.jobs import JobStatus
from auraserve.core.presets import default_presets
from auraserve.core.request import build_request
from auraserve.errors import InsufficientBalance, QueueLimitReached
from auraserve.store import jobs, keys, ledger
from auraserve.store.db import Store
from auraserve.store.schema import accounts
from auraserve.store.schema import jobs as jobs_table
from auraserve.store.schema import ledger as ledger_table
from tests.store_jobs import submit_job, submit_one

PRESET = default_presets()["auraflow-v0-3-512"]
MODEL = "auraflow-v0-3-512"


def test_concurrent_submits_never_overdraw_and_every_reservation_settles_once(db: Store) -> None:
    req = build_request({"prompt": "p", "steps": 25}, model=MODEL, preset=PRESET)
    price = req.price(PRESET)
    affordable = 7
    acct = keys.create_account(db, "small", credits=price * affordable + price // 2)
    barrier = threading.Barrier(16)
    accepted: list[str] = []
    refused = 0
    lock = threading.Lock()

    def submitter() -> None:
        nonlocal refused
        barrier.wait()
        for _ in range(3):
            try:
                sub = submit_one(
                    db,
                    account_id=acct.account_id,
                    request=req,
                    price=price,
                    max_queued=1000,
                    max_attempts=3,
                )
                assert sub.balance >= 0
                with lock:
                    accepted.append(sub.job.id)
            except InsufficientBalance:
                with lock:
                    refused += 1

    threads = [threading.Thread(target=submitter) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(accepted) == affordable
    assert refused == 16 * 3 - affordable
    assert ledger.balance(db, acct.account_id) == price // 2

    # Settle every job: alternate outcomes, and race two settlements for each job.
    claimed = jobs.claim(db, worker_id="w", models=[MODEL], max_images=100, lease_seconds=60)
    assert len(claimed) == affordable
    for i, job in enumerate(claimed):

        def settle(job_id: str = job.id, ok: bool = i % 2 == 0) -> None:
            if ok:
                jobs.complete(
                    db, worker_id="w", job_id=job_id, output={"media": []}, engine_seconds=0
                )
            else:
                jobs.finish_unsuccessful(
                    db, worker_id="w", job_id=job_id, status=JobStatus.FAILED, error="x"
                )

        racers = [threading.Thread(target=settle) for _ in range(3)]
        for t in racers:
            t.start()
        for t in racers:
            t.join()

    with db.read() as conn:
        per_job = conn.execute(
            select(ledger_table.c.job_id, func.count())
            .where(ledger_table.c.kind.in_(["capture", "release"]))
            .group_by(ledger_table.c.job_id)
        ).all()
        total_delta = conn.execute(
            select(func.sum(ledger_table.c.balance_delta)).where(
                ledger_table.c.account_id == acct.account_id
            )
        ).scalar_one()
    assert sorted(j for j, _ in per_job) == sorted(accepted)
    assert all(n == 1 for _, n in per_job)
    captured = (affordable + 1) // 2
    assert ledger.balance(db, acct.account_id) == total_delta
    assert ledger.balance(db, acct.account_id) == price * (affordable - captured) + price // 2


def test_a_submit_touches_the_account_row_last(db: Store) -> None:
    """Every submit of an account waits for the account row's lock (PostgreSQL) from the
    reserving UPDATE to the COMMIT, so that UPDATE is the transaction's last statement; where
    the driver submits at once, the whole submit is one statement."""
    acct = keys.create_account(db, "a", credits=10**9)
    req = build_request({"prompt": "p", "steps": 2}, model=MODEL, preset=PRESET)
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(" ".join(statement.split()))

    def submit(at_once: bool) -> None:
        new = [jobs.NewJob(req, req.price(PRESET))]
        kw: dict[str, Any] = {"account_id": acct.account_id, "new_jobs": new}
        statements.clear()
        event.listen(db.engine, "before_cursor_execute", record)
        try:
            if at_once:
                jobs.submit(db, **kw, max_queued=10, max_attempts=1)
            else:
                with db.write() as conn:
                    jobs.submit_in(conn, **kw, max_queued=10, max_attempts=1)
        finally:
            event.remove(db.engine, "before_cursor_execute", record)
        statements[:] = [s for s in statements if not s.startswith(("BEGIN", "COMMIT"))]

    submit(at_once=False)
    touching = [i for i, s in enumerate(statements) if "accounts" in s]
    assert touching == [len(statements) - 1], statements
    assert statements[0].startswith("INSERT INTO jobs")
    assert statements[-2].startswith("INSERT INTO ledger")
    assert statements[-1].startswith("UPDATE accounts")
    assert sum("pg_notify" in s for s in statements) == (db.driver.name == "postgresql")
    if db.driver.submits_at_once:
        submit(at_once=True)
        [statement] = statements
        assert statement.startswith("WITH reserved AS ( UPDATE accounts"), statement
        assert "INSERT INTO ledger" in statement and "pg_notify" in statement
    entries = ledger.entries(db, acct.account_id)
    assert [e["kind"] for e in entries][:2] == ["grant", "reserve"]
    assert entries[-1]["balance_delta"] == -entries[-1]["amount"]


def test_concurrent_submits_never_pass_the_queue_limit(db: Store) -> None:
    """The queue slots are taken last, after the job's INSERT: refused submits must still
    roll back whole, whatever the interleaving."""
    limit = 5
    acct = keys.create_account(db, "a", credits=10**9)
    barrier = threading.Barrier(12)
    accepted: list[str] = []
    refused: list[QueueLimitReached] = []
    lock = threading.Lock()

    def submitter() -> None:
        barrier.wait()
        for _ in range(2):
            try:
                job_id = submit_job(db, acct.account_id, {"steps": 2}, max_queued=limit)
                with lock:
                    accepted.append(job_id)
            except QueueLimitReached as exc:
                with lock:
                    refused.append(exc)

    threads = [threading.Thread(target=submitter) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(accepted) == limit and len(refused) == 24 - limit
    assert jobs.count_active(db, acct.account_id) == limit
    with db.read() as conn:
        stored = conn.execute(select(jobs_table.c.id)).scalars().all()
        active = conn.execute(select(accounts.c.active_jobs)).scalar_one()
    assert sorted(stored) == sorted(accepted) and active == limit
    reserves = [e for e in ledger.entries(db, acct.account_id) if e["kind"] == "reserve"]
    assert sorted(e["job_id"] for e in reserves) == sorted(accepted)
    assert ledger.balance(db, acct.account_id) == 10**9 - sum(e["amount"] for e in reserves)
