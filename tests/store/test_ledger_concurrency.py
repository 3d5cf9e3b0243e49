"""Money under concurrency: many simultaneous submits against a small balance."""

from __future__ import annotations

import threading

from sqlalchemy import func, select

from auraserve.core.jobs import JobStatus
from auraserve.core.presets import default_presets
from auraserve.core.request import build_request
from auraserve.errors import InsufficientBalance
from auraserve.store import jobs, keys, ledger
from auraserve.store.db import Database
from auraserve.store.schema import ledger as ledger_table

PRESET = default_presets()["auraflow-v0-3-512"]
MODEL = "auraflow-v0-3-512"


def test_concurrent_submits_never_overdraw_and_every_reservation_settles_once(db: Database) -> None:
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
                sub = jobs.submit(
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
