"""S3 media against a real S3-protocol server on loopback (moto's standalone server over HTTP):
the store itself, then whole `serve`-like apps whose workers write to the bucket."""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from auraserve.config import Settings
from auraserve.core.jobs import JobStatus
from auraserve.core.request import GenerationRequest, build_request
from auraserve.engine.base import JobResult
from auraserve.media.factory import open_media_store
from auraserve.media.lifecycle import apply_retention
from auraserve.media.s3 import S3MediaStore
from auraserve.media.storage import new_media_name
from auraserve.runtime import Runtime
from auraserve.store import jobs, keys, ledger
from auraserve.store import media as media_rows
from auraserve.worker.loop import Worker
from tests.conftest import LiveServer, Tenant, make_tenant, wait_for_status
from tests.media.conftest import with_settings
from tests.s3_server import S3Server
from tests.store_jobs import submit_one

MODEL = "auraflow-v0-3-512"
SEED_PATH = f"/{MODEL}/v1/auraflow-v0-3-request"
PNG = b"\x89PNG\r\n\x1a\n-not-really-but-bytes"


def _s3_store(settings: Settings, server: S3Server, bucket: str, **extra: Any) -> S3MediaStore:
    store = open_media_store(with_settings(settings, **server.settings_for(bucket), **extra))
    assert isinstance(store, S3MediaStore)
    return store


def _keys(server: S3Server, bucket: str) -> set[str]:
    listing = server.client().list_objects_v2(Bucket=bucket)
    return {item["Key"] for item in listing.get("Contents", ())}


def _media_files(data_dir: Path) -> list[Path]:
    root = data_dir / "media"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


# The store on its own --------------------------------------------------------------------------


def test_put_get_and_fetch_through_the_presigned_url(
    settings: Settings, s3_server: S3Server, s3_bucket: str
) -> None:
    store = _s3_store(settings, s3_server, s3_bucket, media_presign_seconds=900)
    name = new_media_name("png")
    store.put(name, PNG)
    assert _keys(s3_server, s3_bucket) == {f"media/{name}"}
    assert store.get(name) == PNG

    url = store.url(name)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == s3_server.endpoint
    assert parts.path == f"/{s3_bucket}/media/{name}"
    query = parse_qs(parts.query)
    assert query["X-Amz-Expires"] == ["900"]
    assert query["response-content-type"] == ["image/png"]
    assert store.url(name) == url  # reused while fresh, not re-signed per status poll

    resp = httpx.get(url)
    assert resp.status_code == 200
    assert resp.content == PNG
    # The exact type (never sniffed), shown inline, immutable; S3 cannot send
    # X-Content-Type-Options itself, so the intent is recorded as object metadata.
    assert resp.headers["content-type"] == "image/png"
    assert resp.headers["content-disposition"] == "inline"
    assert resp.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert resp.headers["x-amz-meta-x-content-type-options"] == "nosniff"
    head = s3_server.client().head_object(Bucket=s3_bucket, Key=f"media/{name}")
    assert head["ContentType"] == "image/png"
    assert head["Metadata"] == {"x-content-type-options": "nosniff"}

    store.delete(name)
    assert store.get(name) is None
    assert _keys(s3_server, s3_bucket) == set()
    assert httpx.get(store.url(name)).status_code in (403, 404)
    store.delete(name)  # deleting a missing object is not an error
    store.close()


@pytest.mark.parametrize(("fmt", "media_type"), [("webp", "image/webp"), ("jpeg", "image/jpeg")])
def test_content_type_follows_the_name(
    settings: Settings, s3_server: S3Server, s3_bucket: str, fmt: str, media_type: str
) -> None:
    store = _s3_store(settings, s3_server, s3_bucket)
    name = new_media_name(fmt)
    store.put(name, b"bytes")
    assert httpx.get(store.url(name)).headers["content-type"] == media_type


def test_public_base_url_gives_plain_urls(
    settings: Settings, s3_server: S3Server, s3_bucket: str
) -> None:
    # A CDN in front of a public bucket, here the bucket's own path-style URL.
    s3_server.make_public(s3_bucket)
    base = f"{s3_server.endpoint}/{s3_bucket}/"
    store = _s3_store(settings, s3_server, s3_bucket, media_public_base_url=base)
    name = new_media_name("webp")
    store.put(name, b"RIFF....WEBP")
    url = store.url(name)
    assert url == f"{s3_server.endpoint}/{s3_bucket}/media/{name}"
    resp = httpx.get(url)
    assert resp.status_code == 200 and resp.content == b"RIFF....WEBP"
    assert resp.headers["content-type"] == "image/webp"


def test_bucket_without_prefix(settings: Settings, s3_server: S3Server, s3_bucket: str) -> None:
    store = open_media_store(with_settings(settings, **s3_server.settings_for(s3_bucket, "")))
    name = new_media_name("png")
    store.put(name, PNG)
    assert _keys(s3_server, s3_bucket) == {name}
    assert httpx.get(store.url(name)).content == PNG


def test_listing_sees_only_our_names_under_the_prefix(
    settings: Settings, s3_server: S3Server, s3_bucket: str
) -> None:
    store = _s3_store(settings, s3_server, s3_bucket)
    ours = new_media_name("png")
    store.put(ours, PNG)
    raw = s3_server.client()
    foreign = [
        "media/notes.txt",
        f"media/deeper/{new_media_name('png')}",
        f"other/{new_media_name('png')}",
        new_media_name("png"),
    ]
    for key in foreign:
        raw.put_object(Bucket=s3_bucket, Key=key, Body=b"not ours")
    assert list(store.names_older_than(time.time() + 60)) == [ours]
    assert list(store.names_older_than(time.time() - 3600)) == []
    with pytest.raises(ValueError, match="invalid media name"):
        store.put("../escape.png", b"x")


# Whole apps ------------------------------------------------------------------------------------


@pytest.fixture
def s3_settings(settings: Settings, s3_server: S3Server, s3_bucket: str) -> Settings:
    return with_settings(settings, **s3_server.settings_for(s3_bucket))


@pytest.fixture
def s3_runtime(s3_settings: Settings) -> Iterator[Runtime]:
    rt = Runtime.open(s3_settings)
    yield rt
    rt.close()


@pytest.fixture
def s3_server_app(s3_runtime: Runtime, tiny_engine: Any) -> Iterator[LiveServer]:
    """`auraserve serve` with AURASERVE_MEDIA_URL=s3://...: API plus in-process worker."""
    s3_runtime.engine = tiny_engine
    s3_runtime.start_worker()
    live = LiveServer(s3_runtime).start()
    yield live
    live.stop()


def _submit(client: httpx.Client, tenant: Tenant, **fields: Any) -> str:
    body = {"prompt": "a red kite over dunes", "num_inference_steps": 2, "seed": 5, **fields}
    resp = client.post(SEED_PATH, headers=tenant.headers, json=body)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["request_id"])


def test_serve_writes_to_s3_and_hands_out_fetchable_urls(
    s3_server_app: LiveServer, s3_server: S3Server, s3_bucket: str
) -> None:
    runtime = s3_server_app.runtime
    tenant = make_tenant(runtime)
    with httpx.Client(base_url=s3_server_app.url, timeout=30) as client:
        request_id = _submit(client, tenant, num_images=2)
        final = wait_for_status(client, request_id, tenant.headers)
        assert final["status"] == "COMPLETED", final
        urls = final["output"]["media_url"]
        assert len(urls) == 2
        names = []
        for url in urls:
            assert url.startswith(f"{s3_server.endpoint}/{s3_bucket}/media/")
            resp = httpx.get(url)  # presigned, straight from the S3 server: no API involved
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "image/png"
            assert resp.headers["x-amz-meta-x-content-type-options"] == "nosniff"
            image = Image.open(io.BytesIO(resp.content))
            assert image.format == "PNG" and image.size == (512, 512)
            names.append(urlsplit(url).path.rsplit("/", 1)[1])
        job_id = request_id.rsplit("_", 1)[1]
        assert sorted(names) == media_rows.names_of(runtime.db, job_id)
        assert _keys(s3_server, s3_bucket) == {f"media/{n}" for n in names}
        assert _media_files(runtime.settings.data_dir) == []  # nothing on the local disk

        # /media/NAME on the API (the disk-era URL form) redirects to the object.
        moved = client.get(f"/media/{names[0]}")
        assert moved.status_code == 307
        assert moved.headers["cache-control"] == "no-store"
        assert httpx.get(moved.headers["location"]).content == httpx.get(urls[0]).content
        assert client.get(f"/media/{new_media_name('png')}").status_code == 404
        assert client.get("/media/not-a-name.png").status_code == 404

        # The playground may show images from the bucket's origin (its CSP img-src).
        policy = client.get("/").headers["content-security-policy"]
        img_src = next(p for p in policy.split("; ") if p.startswith("img-src "))
        assert s3_server.endpoint in img_src.split()

        # The OpenAI dialect's b64_json reads the bytes back from the bucket.
        resp = client.post(
            "/v1/images/generations",
            headers={"Authorization": f"Bearer {tenant.key}"},
            json={
                "model": MODEL,
                "prompt": "b64",
                "size": "512x512",
                "quality": "low",
                "response_format": "b64_json",
            },
        )
        assert resp.status_code == 200, resp.text
        data = base64.b64decode(resp.json()["data"][0]["b64_json"])
        assert Image.open(io.BytesIO(data)).format == "PNG"


def test_public_base_url_in_status(
    settings: Settings, s3_server: S3Server, s3_bucket: str, tiny_engine: Any
) -> None:
    s3_server.make_public(s3_bucket)
    base = f"{s3_server.endpoint}/{s3_bucket}"
    rt = Runtime.open(
        with_settings(settings, **s3_server.settings_for(s3_bucket), media_public_base_url=base)
    )
    rt.engine = tiny_engine
    rt.start_worker()
    live = LiveServer(rt).start()
    try:
        tenant = make_tenant(rt)
        with httpx.Client(base_url=live.url, timeout=30) as client:
            final = wait_for_status(client, _submit(client, tenant), tenant.headers)
        [url] = final["output"]["media_url"]
        assert url.startswith(f"{base}/media/") and "?" not in url
        resp = httpx.get(url)
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    finally:
        live.stop()
        rt.close()


def test_worker_on_another_machine(s3_settings: Settings, tmp_path: Path, tiny_engine: Any) -> None:
    """The API and the worker share only the database and the bucket: separate data dirs."""
    api = Runtime.open(s3_settings)
    worker_settings = with_settings(
        s3_settings,
        data_dir=tmp_path / "worker-machine",
        database_url=api.settings.database_url or api.settings.resolved_database_url,
        port=s3_settings.port + 1,
    )
    worker_rt = Runtime.open(worker_settings, engine=tiny_engine)
    live = LiveServer(api).start()
    try:
        worker_rt.start_worker()
        tenant = make_tenant(api)
        with httpx.Client(base_url=live.url, timeout=30) as client:
            final = wait_for_status(client, _submit(client, tenant), tenant.headers)
        assert final["status"] == "COMPLETED", final
        [url] = final["output"]["media_url"]
        resp = httpx.get(url)
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(resp.content)).size == (512, 512)
        assert _media_files(api.settings.data_dir) == []
        assert _media_files(worker_settings.data_dir) == []
    finally:
        live.stop()
        worker_rt.close()
        api.close()


def test_retention_deletes_and_the_status_says_so(
    s3_server_app: LiveServer, s3_server: S3Server, s3_bucket: str
) -> None:
    runtime = s3_server_app.runtime
    tenant = make_tenant(runtime)
    with httpx.Client(base_url=s3_server_app.url, timeout=30) as client:
        request_id = _submit(client, tenant)
        final = wait_for_status(client, request_id, tenant.headers)
        [url] = final["output"]["media_url"]
        name = urlsplit(url).path.rsplit("/", 1)[1]
        deleted = apply_retention(runtime.db, runtime.media, retention=3600, now=time.time() + 3601)
        assert deleted == 1
        assert _keys(s3_server, s3_bucket) == set()
        assert httpx.get(url).status_code in (403, 404)
        body = client.get(f"/v2/requests/status/{request_id}", headers=tenant.headers).json()
        assert body["status"] == "COMPLETED"
        assert body["output"] is None and body["error"] is None
        assert body["note"].startswith(
            "outputs are deleted 3600 s after completion (AURASERVE_MEDIA_RETENTION)"
        )
        assert client.get(f"/media/{name}").status_code == 404


class _LosesItsLease:
    """The tiny engine, but by the time it returns the job's lease has expired and the job was
    requeued (a worker stalled past its lease): the completion will be refused."""

    description = "tiny engine that outlives its lease"
    is_test_model = True

    def __init__(self, engine: Any, runtime: Runtime) -> None:
        self.engine = engine
        self.runtime = runtime

    def generate(self, requests: Sequence[GenerationRequest], **kw: Any) -> list[JobResult]:
        results: list[JobResult] = self.engine.generate(requests, **kw)
        requeued, _ = jobs.recover_expired(self.runtime.db, now=time.time() + 3600)
        assert requeued
        return results


def _queued_job(rt: Runtime) -> tuple[str, str]:
    acct = keys.create_account(rt.db, "w", credits=10_000)
    preset = rt.settings.presets[MODEL]
    req = build_request({"prompt": "lease", "steps": 2}, model=MODEL, preset=preset)
    job_id = submit_one(
        rt.db,
        account_id=acct.account_id,
        request=req,
        price=req.price(preset),
        max_queued=10,
        max_attempts=3,
    ).job.id
    return acct.account_id, job_id


def test_refused_completion_deletes_its_objects(
    s3_runtime: Runtime, s3_server: S3Server, s3_bucket: str, tiny_engine: Any
) -> None:
    account_id, job_id = _queued_job(s3_runtime)
    worker = Worker(
        db=s3_runtime.db,
        settings=s3_runtime.settings,
        engine=_LosesItsLease(tiny_engine, s3_runtime),
        media=s3_runtime.media,
        worker_id="stalled",
    )
    claimed = jobs.claim(
        s3_runtime.db, worker_id="stalled", models=[MODEL], max_images=1, lease_seconds=30
    )
    worker.run_batch(claimed)
    job = jobs.get(s3_runtime.db, job_id)
    assert job is not None and job.status == JobStatus.QUEUED  # someone else's to finish
    assert _keys(s3_server, s3_bucket) == set()  # its image went with the refusal
    assert media_rows.names_of(s3_runtime.db, job_id) == []
    assert [e["kind"] for e in ledger.entries(s3_runtime.db, account_id)] == ["grant", "reserve"]


def test_failed_write_errors_the_job_and_is_logged(
    settings: Settings, s3_server: S3Server, tiny_engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A bucket that does not exist: every write fails the way a misconfigured store does.
    rt = Runtime.open(with_settings(settings, **s3_server.settings_for("no-such-bucket-here")))
    try:
        account_id, job_id = _queued_job(rt)
        worker = Worker(db=rt.db, settings=rt.settings, engine=tiny_engine, media=rt.media)
        claimed = jobs.claim(
            rt.db, worker_id=worker.worker_id, models=[MODEL], max_images=1, lease_seconds=30
        )
        with caplog.at_level(logging.ERROR, logger="auraserve.worker.loop"):
            worker.run_batch(claimed)
        job = jobs.get(rt.db, job_id)
        assert job is not None and job.status == JobStatus.ERROR
        assert job.error is not None and job.error.startswith("could not store the image")
        kinds = [e["kind"] for e in ledger.entries(rt.db, account_id)]
        assert kinds == ["grant", "reserve", "release"]  # refunded
        [record] = [r for r in caplog.records if job_id in r.getMessage()]
        assert record.levelno == logging.ERROR
        assert "NoSuchBucket" in record.getMessage()
    finally:
        rt.close()


@contextlib.contextmanager
def _completions_refused(rt: Runtime) -> Iterator[None]:
    """A database that fails every completion (a trigger aborts it), as a connection lost at
    COMMIT or a violated constraint fails it: the transaction rolls back and the call raises."""
    sqlite = rt.db.driver.name == "sqlite"
    with rt.db.write() as conn:
        if sqlite:
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse_completion BEFORE UPDATE OF status ON jobs "
                "WHEN NEW.status = 'COMPLETED' BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE FUNCTION refuse_completion() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse_completion BEFORE UPDATE ON jobs FOR EACH ROW "
                "WHEN (NEW.status = 'COMPLETED') EXECUTE FUNCTION refuse_completion()"
            )
    try:
        yield
    finally:
        # PostgreSQL tests share one database per session: leave no trigger behind.
        with rt.db.write() as conn:
            if sqlite:
                conn.exec_driver_sql("DROP TRIGGER refuse_completion")
            else:
                conn.exec_driver_sql("DROP TRIGGER refuse_completion ON jobs")
                conn.exec_driver_sql("DROP FUNCTION refuse_completion()")


def test_failed_completion_deletes_its_objects(
    s3_runtime: Runtime, s3_server: S3Server, s3_bucket: str, tiny_engine: Any
) -> None:
    _, job_id = _queued_job(s3_runtime)
    worker = Worker(
        db=s3_runtime.db, settings=s3_runtime.settings, engine=tiny_engine, media=s3_runtime.media
    )
    claimed = jobs.claim(
        s3_runtime.db, worker_id=worker.worker_id, models=[MODEL], max_images=1, lease_seconds=30
    )
    with _completions_refused(s3_runtime), pytest.raises(Exception, match="refused"):
        worker.run_batch(claimed)  # the worker loop logs it and goes on; the lease rescues
    job = jobs.get(s3_runtime.db, job_id)
    assert job is not None and job.status == JobStatus.PROCESSING  # rolled back
    assert media_rows.names_of(s3_runtime.db, job_id) == []
    assert _keys(s3_server, s3_bucket) == set()  # owned by no row, so the worker deleted it
