"""`jobs.hand_back`: a stopping worker returns its jobs as if it never claimed them."""

from __future__ import annotations

from auraserve.core.jobs import JobStatus
from auraserve.core.presets import default_presets
from auraserve.store import jobs, keys, ledger
from auraserve.store.db import Store
from tests.store_jobs import submit_job

MODEL = "auraflow-v0-3-512"
PRESET = default_presets()[MODEL]


def _submit(db: Store, account_id: str, prompt: str) -> str:
    return submit_job(db, account_id, {"prompt": prompt, "steps": 2}, model=MODEL, max_queued=10)


def _claim(db: Store, worker_id: str) -> list[str]:
    claimed = jobs.claim(db, worker_id=worker_id, models=[MODEL], max_images=4, lease_seconds=30)
    return [j.id for j in claimed]


def test_handed_back_jobs_are_queued_with_the_attempt_returned(db: Store) -> None:
    acct = keys.create_account(db, "a", credits=10_000)
    first, second = _submit(db, acct.account_id, "one"), _submit(db, acct.account_id, "two")
    assert set(_claim(db, "w1")) == {first, second}
    balance = ledger.balance(db, acct.account_id)

    # Fenced: another worker cannot hand back what w1 holds.
    assert jobs.hand_back(db, worker_id="w2", job_ids=[first, second]) == []
    assert sorted(jobs.hand_back(db, worker_id="w1", job_ids=[first, second])) == sorted(
        [first, second]
    )
    for job_id in (first, second):
        job = jobs.get(db, job_id)
        assert job is not None
        assert job.status == JobStatus.QUEUED and job.attempts == 0
        assert job.lease_owner is None
        assert "handed back to the queue: w1 stopped" in [m for _, m in job.logs]
    # Nothing settled: the reservation stands, and the next claim runs them as attempt 1.
    assert ledger.balance(db, acct.account_id) == balance
    assert set(_claim(db, "w2")) == {first, second}
    assert {jobs.get(db, j).attempts for j in (first, second)} == {1}  # type: ignore[union-attr]
    # A second hand-back of the same jobs by the old owner changes nothing.
    assert jobs.hand_back(db, worker_id="w1", job_ids=[first]) == []


def test_a_job_the_client_cancelled_meanwhile_ends_cancelled_and_refunded(db: Store) -> None:
    acct = keys.create_account(db, "a", credits=10_000)
    job_id = _submit(db, acct.account_id, "one")
    _claim(db, "w1")
    assert jobs.cancel(db, job_id, account_id=acct.account_id).outcome == "requested"  # type: ignore[union-attr]
    assert jobs.hand_back(db, worker_id="w1", job_ids=[job_id]) == []
    job = jobs.get(db, job_id)
    assert job is not None and job.status == JobStatus.CANCELLED
    assert ledger.balance(db, acct.account_id) == 10_000
    kinds = [e["kind"] for e in ledger.entries(db, acct.account_id)]
    assert kinds.count("release") == 1
