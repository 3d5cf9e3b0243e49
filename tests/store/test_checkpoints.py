"""Step checkpoint rows: fenced on the job's lease, one per job, kept from the orphan sweep
while the job runs, dropped by their writer or by maintenance when the job ends. Both stores."""

from __future__ import annotations

from auraserve.core.jobs import JobStatus
from auraserve.store import checkpoints, jobs, keys, stats
from auraserve.store import media as media_rows
from auraserve.store.db import Store
from tests.store_jobs import MODEL, submit_job


def _running(db: Store, worker_id: str = "w1") -> str:
    account = keys.create_account(db, "ckpt", credits=10_000)
    job_id = submit_job(db, account.account_id)
    [claimed] = jobs.claim(db, worker_id=worker_id, models=[MODEL], max_images=4, lease_seconds=30)
    assert claimed.id == job_id
    return job_id


def test_one_row_per_job_replaced_as_it_moves_on(db: Store) -> None:
    job_id = _running(db)
    first = checkpoints.save(
        db, worker_id="w1", job_id=job_id, name="a.ckpt", step=2, total=8, size=100
    )
    assert first is not None and first.replaced is None
    second = checkpoints.save(
        db, worker_id="w1", job_id=job_id, name="b.ckpt", step=4, total=8, size=120
    )
    assert second is not None and second.replaced == "a.ckpt"  # the caller deletes it
    [record] = checkpoints.of_jobs(db, [job_id]).values()
    assert (record.name, record.step, record.total, record.size) == ("b.ckpt", 4, 8, 120)
    # The bytes held, as the metrics export them (auraserve_checkpoint_bytes_stored).
    assert stats.sample(db, stale_seconds=30).checkpoint_bytes == 120
    # The orphan sweep keeps a running job's checkpoint, not the one it replaced.
    assert media_rows.owned(db, ["a.ckpt", "b.ckpt"]) == {"b.ckpt"}


def test_a_worker_that_lost_the_job_writes_no_checkpoint(db: Store) -> None:
    job_id = _running(db, worker_id="w1")
    assert (
        checkpoints.save(db, worker_id="w2", job_id=job_id, name="x.ckpt", step=1, total=8, size=1)
        is None
    )
    jobs.hand_back(db, worker_id="w1", job_ids=[job_id])  # queued again: nobody's lease
    assert (
        checkpoints.save(db, worker_id="w1", job_id=job_id, name="y.ckpt", step=3, total=8, size=1)
        is None
    )
    assert checkpoints.of_jobs(db, [job_id]) == {}


def test_a_takeover_keeps_the_old_checkpoint_until_it_writes_its_own(db: Store) -> None:
    job_id = _running(db, worker_id="w1")
    checkpoints.save(db, worker_id="w1", job_id=job_id, name="old.ckpt", step=3, total=8, size=9)
    jobs.hand_back(db, worker_id="w1", job_ids=[job_id])
    [claimed] = jobs.claim(db, worker_id="w2", models=[MODEL], max_images=4, lease_seconds=30)
    assert checkpoints.of_jobs(db, [job_id])[job_id].name == "old.ckpt"  # w2 resumes from it
    checkpoints.mark_resumed(db, worker_id="w2", job_ids=[job_id], step=3)
    job = jobs.get(db, job_id)
    assert job is not None and job.progress_resumed_from == 3 and job.progress_step == 3
    # Nobody drops it while the job is live (the old worker settling late, say).
    assert checkpoints.drop(db, job_id=job_id) is None
    saved = checkpoints.save(
        db, worker_id="w2", job_id=claimed.id, name="new.ckpt", step=5, total=8, size=9
    )
    assert saved is not None and saved.replaced == "old.ckpt"
    jobs.complete(db, worker_id="w2", job_id=job_id, output={}, engine_seconds=1.0)
    assert checkpoints.drop(db, job_id=job_id) == "new.ckpt"
    assert checkpoints.of_jobs(db, [job_id]) == {}
    assert stats.sample(db, stale_seconds=30).checkpoint_bytes == 0


def test_maintenance_forgets_the_checkpoints_of_jobs_that_ended_without_their_worker(
    db: Store,
) -> None:
    job_id = _running(db, worker_id="w1")
    checkpoints.save(db, worker_id="w1", job_id=job_id, name="left.ckpt", step=3, total=8, size=9)
    assert checkpoints.forget_finished(db) == []  # still running: kept
    jobs.finish_unsuccessful(
        db, worker_id="w1", job_id=job_id, status=JobStatus.ERROR, error="worker kept dying"
    )
    assert checkpoints.forget_finished(db) == ["left.ckpt"]  # the caller deletes the object
    assert media_rows.owned(db, ["left.ckpt"]) == set()
    assert checkpoints.forget_finished(db) == []


def test_a_fresh_attempt_clears_an_earlier_resume_mark(db: Store) -> None:
    job_id = _running(db, worker_id="w1")
    checkpoints.mark_resumed(db, worker_id="w1", job_ids=[job_id], step=4)
    checkpoints.mark_resumed(db, worker_id="w1", job_ids=[job_id], step=None)
    job = jobs.get(db, job_id)
    assert job is not None and job.progress_resumed_from is None
    checkpoints.mark_resumed(db, worker_id="other", job_ids=[job_id], step=6)  # not its lease
    job = jobs.get(db, job_id)
    assert job is not None and job.progress_resumed_from is None
