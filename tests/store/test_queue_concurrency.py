"""The queue under real concurrency: several worker processes, many jobs, one store.

Runs on whichever backend the suite runs on; on PostgreSQL the claims go through
FOR UPDATE SKIP LOCKED, on SQLite through BEGIN IMMEDIATE across processes.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import Counter

from sqlalchemy import func, select

from auraserve.config import Settings, default_presets
from auraserve.core.jobs import JobStatus
from auraserve.core.request import build_request
from auraserve.store import jobs, keys, ledger
from auraserve.store.db import Store
from auraserve.store.schema import jobs as jobs_table
from auraserve.store.schema import ledger as ledger_table
from tests.store_jobs import submit_one

PRESET = default_presets()["auraflow-v0-3-512"]
MODEL = "auraflow-v0-3-512"


def _request(i: int):
    # Two batch keys, so batched claims mix with single ones.
    return build_request(
        {"prompt": f"job {i}", "steps": 4 + (i % 2), "seed": i}, model=MODEL, preset=PRESET
    )


def _worker_process(url: str, worker_id: str, queue: mp.Queue) -> None:
    db = Store(url)
    claimed: list[str] = []
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < 1.5:
        batch = jobs.claim(db, worker_id=worker_id, models=[MODEL], max_images=3, lease_seconds=30)
        if not batch:
            time.sleep(0.01)
            continue
        idle_since = time.monotonic()
        for job in batch:
            claimed.append(job.id)
            done = jobs.complete(
                db, worker_id=worker_id, job_id=job.id, output={"media": []}, engine_seconds=0.0
            )
            assert done is not None
    queue.put((worker_id, claimed))
    db.dispose()


def test_many_worker_processes_claim_each_job_exactly_once(db: Store, settings: Settings) -> None:
    acct = keys.create_account(db, "load", credits=10**9)
    n_jobs = 300
    for i in range(n_jobs):
        req = _request(i)
        submit_one(
            db,
            account_id=acct.account_id,
            request=req,
            price=req.price(PRESET),
            max_queued=10**6,
            max_attempts=3,
        )
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker_process, args=(settings.resolved_database_url, f"w{i}", results))
        for i in range(4)
    ]
    for p in procs:
        p.start()
    per_worker = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    claims = Counter(job_id for ids in per_worker.values() for job_id in ids)
    assert len(claims) == n_jobs, "some jobs were never claimed"
    assert max(claims.values()) == 1, "a job was claimed twice"
    assert sum(1 for ids in per_worker.values() if ids) >= 2, "only one worker did any work"
    with db.read() as conn:
        statuses = dict(
            conn.execute(
                select(jobs_table.c.status, func.count()).group_by(jobs_table.c.status)
            ).all()
        )
        captures = conn.execute(
            select(func.count()).select_from(ledger_table).where(ledger_table.c.kind == "capture")
        ).scalar_one()
    assert statuses == {"COMPLETED": n_jobs}
    assert captures == n_jobs


def test_claim_order_is_priority_then_age_and_batches_share_a_key(db: Store) -> None:
    acct = keys.create_account(db, "order", credits=10**6)
    ids = []
    for i in range(5):
        req = _request(i)
        sub = submit_one(
            db,
            account_id=acct.account_id,
            request=req,
            price=1,
            max_queued=100,
            max_attempts=3,
            priority=1 if i == 3 else 0,
        )
        ids.append(sub.job.id)
        time.sleep(0.002)
    # One at a time: priority 0 before 1; within a priority, oldest first.
    order = []
    while batch := jobs.claim(db, worker_id="w", models=[MODEL], max_images=1, lease_seconds=30):
        order += [j.id for j in batch]
    assert order == [ids[0], ids[1], ids[2], ids[4], ids[3]]


def test_batches_share_the_heads_key_and_fit_max_images(db: Store) -> None:
    acct = keys.create_account(db, "batch", credits=10**6)
    ids = []
    for i in range(6):
        req = build_request(
            {"prompt": f"b{i}", "steps": 4 + (i % 2), "num_images": 1 + (i == 2)},
            model=MODEL,
            preset=PRESET,
        )
        ids.append(
            submit_one(
                db, account_id=acct.account_id, request=req, price=1, max_queued=100, max_attempts=3
            ).job.id
        )
        time.sleep(0.002)
    first = jobs.claim(db, worker_id="w", models=[MODEL], max_images=3, lease_seconds=30)
    # ids[0] (1 image) + ids[2] (2 images) fill 3 images; all share steps=4.
    assert [j.id for j in first] == [ids[0], ids[2]]
    assert {j.request.batch_key for j in first} == {first[0].request.batch_key}
    second = jobs.claim(db, worker_id="w", models=[MODEL], max_images=3, lease_seconds=30)
    assert [j.id for j in second] == [ids[1], ids[3], ids[5]]
    # A worker that serves other models claims nothing.
    assert jobs.claim(db, worker_id="w", models=["other"], max_images=10, lease_seconds=30) == []


def test_expired_lease_is_requeued_then_errors_and_refunds(db: Store) -> None:
    acct = keys.create_account(db, "lease", credits=1000)
    req = _request(0)
    price = req.price(PRESET)
    sub = submit_one(
        db, account_id=acct.account_id, request=req, price=price, max_queued=10, max_attempts=2
    )
    for attempt in (1, 2):
        (job,) = jobs.claim(
            db, worker_id=f"dead{attempt}", models=[MODEL], max_images=1, lease_seconds=0.05
        )
        assert job.attempts == attempt
        time.sleep(0.1)
        requeued, errored = jobs.recover_expired(db)
        if attempt == 1:
            assert requeued == [sub.job.id] and errored == []
        else:
            assert requeued == [] and errored == [sub.job.id]
    final = jobs.get(db, sub.job.id)
    assert final is not None and final.status == JobStatus.ERROR
    assert "not charged" in (final.error or "")
    assert ledger.balance(db, acct.account_id) == 1000
    # The presumed-dead worker comes back: fenced out, nothing charged.
    assert (
        jobs.complete(
            db, worker_id="dead2", job_id=sub.job.id, output={"media": []}, engine_seconds=0
        )
        is None
    )
    assert [e["kind"] for e in ledger.entries(db, acct.account_id)] == [
        "grant",
        "reserve",
        "release",
    ]


def test_heartbeat_keeps_a_lease_and_fences_a_stale_owner(db: Store) -> None:
    acct = keys.create_account(db, "hb", credits=1000)
    req = _request(0)
    sub = submit_one(
        db, account_id=acct.account_id, request=req, price=1, max_queued=10, max_attempts=3
    )
    jobs.claim(db, worker_id="w1", models=[MODEL], max_images=1, lease_seconds=0.2)
    for _ in range(3):
        time.sleep(0.1)
        ours, _ = jobs.report_progress(
            db, worker_id="w1", job_ids=[sub.job.id], step=1, total=4, lease_seconds=0.2
        )
        assert ours == {sub.job.id}
        assert jobs.recover_expired(db) == ([], [])
    ours, _ = jobs.report_progress(
        db, worker_id="intruder", job_ids=[sub.job.id], step=2, total=4, lease_seconds=10
    )
    assert ours == set()
