"""media_objects rows: written with the completion, never for a refused one, expired once."""

from __future__ import annotations

import json
import threading
import time

from sqlalchemy import select

from auraserve.core.presets import default_presets
from auraserve.media.storage import new_media_name
from auraserve.store import jobs, keys
from auraserve.store import media as media_rows
from auraserve.store.db import Store
from auraserve.store.schema import media_objects
from tests.store_jobs import submit_job

MODEL = "auraflow-v0-3-512"
PRESET = default_presets()[MODEL]


def _claimed_job(db: Store, worker_id: str = "w1") -> str:
    acct = keys.create_account(db, "m", credits=10_000)
    job_id = submit_job(db, acct.account_id, {"prompt": "m"}, model=MODEL)
    claimed = jobs.claim(db, worker_id=worker_id, models=[MODEL], max_images=1, lease_seconds=30)
    assert [j.id for j in claimed] == [job_id]
    return job_id


def _complete(db: Store, job_id: str, names: list[str], worker_id: str = "w1") -> object:
    output = {"media": names, "media_type": "image/png", "seeds": [1] * len(names)}
    return jobs.complete(db, worker_id=worker_id, job_id=job_id, output=output, engine_seconds=0.1)


def test_completion_records_its_images_in_its_transaction(db: Store) -> None:
    job_id = _claimed_job(db)
    names = [new_media_name("png"), new_media_name("png")]
    before = time.time()
    assert _complete(db, job_id, names) is not None
    assert media_rows.names_of(db, job_id) == sorted(names)
    assert media_rows.owned(db, [*names, new_media_name("png")]) == set(names)
    assert media_rows.is_owned(db, names[0])
    assert not media_rows.is_owned(db, new_media_name("png"))
    with db.read() as conn:
        created = conn.scalars(select(media_objects.c.created_at)).all()
    assert all(before <= c <= time.time() for c in created)


def test_a_refused_completion_records_nothing(db: Store) -> None:
    job_id = _claimed_job(db)
    names = [new_media_name("webp")]
    # Another worker's completion (its lease is not ours) is fenced out, and so are its rows.
    assert _complete(db, job_id, names, worker_id="someone-else") is None
    assert media_rows.owned(db, names) == set()
    assert media_rows.names_of(db, job_id) == []


def test_expire_marks_outputs_and_forgets_rows_once(db: Store) -> None:
    old_job = _claimed_job(db)
    old_names = [new_media_name("png"), new_media_name("png")]
    _complete(db, old_job, old_names)
    cutoff = time.time() + 0.001
    time.sleep(0.01)
    young_job = _claimed_job(db)
    young_names = [new_media_name("png")]
    _complete(db, young_job, young_names)

    now = time.time()
    expired = media_rows.expire_older_than(db, cutoff=cutoff, retention=60.0, now=now)
    assert expired.job_ids == [old_job]
    assert sorted(expired.names) == sorted(old_names)
    assert media_rows.owned(db, old_names + young_names) == set(young_names)
    job = jobs.get(db, old_job)
    assert job is not None and job.output is not None
    assert job.output["expired_at"] == now and job.output["retention_seconds"] == 60.0
    assert job.output["seeds"] == [1, 1]  # the rest of the output stays
    untouched = jobs.get(db, young_job)
    assert untouched is not None and untouched.output is not None
    assert "expired_at" not in untouched.output
    # Nothing left before the cutoff: a second run (another replica) expires nothing.
    again = media_rows.expire_older_than(db, cutoff=cutoff, retention=60.0, now=now)
    assert again.job_ids == [] and again.names == []


def test_concurrent_expiry_deletes_each_row_once(db: Store) -> None:
    names_by_job = {}
    for _ in range(6):
        job_id = _claimed_job(db)
        names = [new_media_name("png")]
        _complete(db, job_id, names)
        names_by_job[job_id] = names
    cutoff = time.time() + 1
    results: list[media_rows.Expired] = []
    lock = threading.Lock()

    def expire() -> None:
        while True:
            got = media_rows.expire_older_than(
                db, cutoff=cutoff, retention=1.0, now=time.time(), limit=2
            )
            if not got.job_ids:
                return
            with lock:
                results.append(got)

    threads = [threading.Thread(target=expire) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    deleted = [n for r in results for n in r.names]
    assert sorted(deleted) == sorted(n for ns in names_by_job.values() for n in ns)
    expired_jobs = [j for r in results for j in r.job_ids]
    assert sorted(expired_jobs) == sorted(names_by_job)
    with db.read() as conn:
        outputs = conn.execute(select(media_objects)).all()
    assert outputs == []
    for job_id in names_by_job:
        job = jobs.get(db, job_id)
        assert job is not None and job.output is not None
        assert "expired_at" in job.output
        assert json.dumps(job.output)  # still one valid JSON object
