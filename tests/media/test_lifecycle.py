"""The orphan sweep and retention, on disk and on a real S3-protocol server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from auraserve.config import Settings
from auraserve.core.presets import default_presets
from auraserve.core.status import status_body
from auraserve.media.factory import open_media_store
from auraserve.media.lifecycle import MediaMaintenance, apply_retention, sweep_orphans
from auraserve.media.storage import MediaStore, new_media_name
from auraserve.store import jobs, keys
from auraserve.store.db import Store
from tests.media.conftest import with_settings
from tests.s3_server import S3Server
from tests.store_jobs import submit_job

MODEL = "auraflow-v0-3-512"
PRESET = default_presets()[MODEL]
GRACE = 3600.0


@pytest.fixture(params=["disk", "s3"])
def media(request: pytest.FixtureRequest, settings: Settings) -> Iterator[MediaStore]:
    if request.param == "disk":
        store = open_media_store(settings)
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        bucket = server.make_bucket()
        store = open_media_store(with_settings(settings, **server.settings_for(bucket)))
    yield store
    store.close()


def _completed_job(db: Store, media: MediaStore, n: int = 1) -> tuple[str, list[str]]:
    acct = keys.create_account(db, "l", credits=10_000)
    job_id = submit_job(db, acct.account_id, {"prompt": "l"}, model=MODEL)
    jobs.claim(db, worker_id="w", models=[MODEL], max_images=4, lease_seconds=30)
    names = [new_media_name("png") for _ in range(n)]
    for name in names:
        media.put(name, b"\x89PNG owned")
    output = {"media": names, "media_type": "image/png", "seeds": [7] * n}
    done = jobs.complete(db, worker_id="w", job_id=job_id, output=output, engine_seconds=0.1)
    assert done is not None
    return job_id, names


def _stored(media: MediaStore) -> set[str]:
    return set(media.names_older_than(time.time() + 10))


def test_sweep_removes_old_orphans_only(db: Store, media: MediaStore) -> None:
    _, owned = _completed_job(db, media, n=2)
    old_orphan = new_media_name("webp")
    media.put(old_orphan, b"RIFF orphan")
    # S3 reports LastModified in whole seconds: leave a clear second between old and young.
    time.sleep(1.1)
    boundary = time.time()
    time.sleep(1.1)
    young_orphan = new_media_name("jpeg")
    media.put(young_orphan, b"\xff\xd8 young")
    assert _stored(media) == {*owned, old_orphan, young_orphan}

    # As seen GRACE seconds after `boundary`: the old orphan is past its grace, the young one
    # is not (a completion may still be on its way), the owned ones are never touched.
    removed = sweep_orphans(db, media, grace=GRACE, now=boundary + GRACE)
    assert removed == 1
    assert _stored(media) == {*owned, young_orphan}
    assert media.get(old_orphan) is None
    assert media.get(owned[0]) == b"\x89PNG owned"
    # Later, the young orphan's grace has passed too; the owned images still stay.
    assert sweep_orphans(db, media, grace=GRACE, now=time.time() + GRACE + 5) == 1
    assert _stored(media) == set(owned)


def test_retention_deletes_outputs_and_says_so(db: Store, media: MediaStore) -> None:
    old_job, old_names = _completed_job(db, media, n=2)
    time.sleep(0.05)
    cutoff_now = time.time()
    young_job, young_names = _completed_job(db, media)
    retention = 3600.0

    deleted = apply_retention(db, media, retention=retention, now=cutoff_now + retention)
    assert deleted == 2
    assert _stored(media) == set(young_names)
    assert all(media.get(n) is None for n in old_names)

    job = jobs.get(db, old_job)
    assert job is not None
    body = status_body(job, media.url)
    assert body["status"] == "COMPLETED"
    assert body["output"] is None and body["error"] is None
    assert "AURASERVE_MEDIA_RETENTION" in body["note"]
    assert "3600 s after completion" in body["note"]
    assert body["seeds"] == [7, 7]
    young = jobs.get(db, young_job)
    assert young is not None
    assert status_body(young, media.url)["output"]["media_url"] == [media.url(young_names[0])]
    assert "note" not in status_body(young, media.url)
    # Idempotent: a second pass (or another replica's) finds nothing more to delete.
    assert apply_retention(db, media, retention=retention, now=cutoff_now + retention) == 0


def test_retention_off_keeps_everything(db: Store, media: MediaStore) -> None:
    _, names = _completed_job(db, media)
    assert apply_retention(db, media, retention=0, now=time.time() + 10**9) == 0
    assert _stored(media) == set(names)


def test_maintenance_round_runs_both(db: Store, media: MediaStore) -> None:
    _, names = _completed_job(db, media)
    orphan = new_media_name("png")
    media.put(orphan, b"orphan")
    MediaMaintenance(db, media, grace=1.0, retention=0).run(time.time() + 5)
    assert _stored(media) == set(names)
    MediaMaintenance(db, media, grace=1.0, retention=1.0).run(time.time() + 5)
    assert _stored(media) == set()


def test_disk_sweep_ignores_foreign_files(db: Store, settings: Settings) -> None:
    store = open_media_store(settings)
    root: Path = settings.media_dir
    (root / "ab").mkdir(parents=True, exist_ok=True)
    stray = root / "ab" / "notes.txt"
    stray.write_text("not an image of ours")
    tmp = root / "ab" / ".tmp-123"
    tmp.write_bytes(b"half")
    assert sweep_orphans(db, store, grace=1.0, now=time.time() + 10) == 0
    assert stray.exists() and tmp.exists()


def test_serving_processes_sweep_on_their_maintenance_timer(settings: Settings) -> None:
    from auraserve.runtime import Runtime

    rt = Runtime.open(
        with_settings(settings, media_orphan_grace_seconds=0.5, media_sweep_interval_seconds=0.2)
    )
    try:
        _, owned = _completed_job(rt.db, rt.media)
        orphan = new_media_name("png")
        rt.media.put(orphan, b"orphan")
        rt.start_maintenance()
        deadline = time.monotonic() + 10
        while rt.media.get(orphan) is not None:
            assert time.monotonic() < deadline, "the maintenance timer never swept"
            time.sleep(0.1)
        assert _stored(rt.media) == set(owned)
    finally:
        rt.close()
