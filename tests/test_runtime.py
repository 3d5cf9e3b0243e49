"""Runtime.open: the server key from the settings, shared by replicas with separate data dirs;
the maintenance tasks every serving process runs (lease rescue)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from auraserve.config import Settings, load_settings
from auraserve.core.jobs import JobStatus
from auraserve.core.request import build_request
from auraserve.errors import ConfigError
from auraserve.runtime import Maintenance, PeriodicTask, Runtime
from auraserve.store import jobs, keys
from tests.store_jobs import submit_one

KEY = "k" * 40


def test_replicas_given_one_secret_key_derive_the_same_webhook_secret(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = Runtime.open(
        load_settings(data_dir=tmp_path / "a", database_url=db_url, secret_key=KEY)
    )
    second = Runtime.open(
        load_settings(data_dir=tmp_path / "b", database_url=db_url, secret_key=KEY)
    )
    try:
        assert first.db.server_key is not None and second.db.server_key is not None
        assert first.db.server_key.webhook_secret(
            "acct_x", 1
        ) == second.db.server_key.webhook_secret("acct_x", 1)
        # A configured key means no key file is written into either data dir.
        assert not (tmp_path / "a" / "secret.key").exists()
        assert not (tmp_path / "b" / "secret.key").exists()
    finally:
        first.close()
        second.close()


def test_a_key_file_setting_is_used(tmp_path: Path) -> None:
    key_file = tmp_path / "server.key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    a = Runtime.open(load_settings(data_dir=tmp_path / "a", secret_key_file=key_file))
    b = Runtime.open(load_settings(data_dir=tmp_path / "b", secret_key=KEY))
    try:
        assert a.db.server_key is not None and b.db.server_key is not None
        assert a.db.server_key.webhook_secret("acct_y", 2) == b.db.server_key.webhook_secret(
            "acct_y", 2
        )
    finally:
        a.close()
        b.close()


def test_a_short_secret_key_stops_the_start_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"AURASERVE_SECRET_KEY: .*at least 32 characters"):
        load_settings(secret_key="short")


# --- maintenance: lease rescue from any serving process ---------------------------------------


def _queued_job(rt: Runtime) -> tuple[str, str]:
    model = "auraflow-v0-3-512"
    preset = rt.settings.presets[model]
    acct = keys.create_account(rt.db, "r", credits=10_000)
    req = build_request({"prompt": "rescue me", "steps": 2}, model=model, preset=preset)
    job_id = submit_one(
        rt.db,
        account_id=acct.account_id,
        request=req,
        price=req.price(preset),
        max_queued=10,
        max_attempts=3,
    ).job.id
    return job_id, model


def test_an_api_only_runtime_rescues_a_job_whose_worker_died(settings: Settings) -> None:
    """Every worker dead: a worker claimed the job, then vanished (never heartbeats again).
    A runtime with no worker at all, as an API replica runs, requeues the job within
    lease_seconds + sweep_interval_seconds."""
    lease, sweep = 1.0, 0.5
    settings = settings.model_copy(
        update={"lease_seconds": lease, "heartbeat_seconds": 0.5, "sweep_interval_seconds": sweep}
    )
    rt = Runtime.open(settings)
    try:
        job_id, model = _queued_job(rt)
        jobs.claim(rt.db, worker_id="dead", models=[model], max_images=1, lease_seconds=lease)
        claimed_at = time.monotonic()
        rt.start_maintenance()
        while True:
            job = jobs.get(rt.db, job_id)
            assert job is not None
            if job.status != JobStatus.PROCESSING:
                break
            assert time.monotonic() - claimed_at < lease + sweep + 1.0, "still PROCESSING"
            time.sleep(0.05)
        rescued_after = time.monotonic() - claimed_at
        print(f"rescued after {rescued_after:.2f} s (lease {lease} s + sweep {sweep} s)")
        assert job.status == JobStatus.QUEUED and job.lease_owner is None
        assert rescued_after >= lease - 0.1  # not before the lease ran out
    finally:
        rt.close()


def test_admin_runtimes_run_no_maintenance(settings: Settings) -> None:
    settings = settings.model_copy(
        update={"lease_seconds": 0.3, "heartbeat_seconds": 0.1, "sweep_interval_seconds": 0.1}
    )
    rt = Runtime.open(settings)  # as `auraserve keys ...` opens it: no start_maintenance
    try:
        job_id, model = _queued_job(rt)
        jobs.claim(rt.db, worker_id="dead", models=[model], max_images=1, lease_seconds=0.3)
        time.sleep(1.0)
        job = jobs.get(rt.db, job_id)
        assert job is not None and job.status == JobStatus.PROCESSING
        assert not rt.maintenance.running
    finally:
        rt.close()


def test_a_failing_maintenance_task_is_logged_once_per_streak(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0
    healthy = threading.Event()

    def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls <= 5:
            raise ConnectionError("database unreachable")
        healthy.set()

    maintenance = Maintenance([PeriodicTask("flaky", 0.01, flaky)])
    with caplog.at_level(logging.INFO, logger="auraserve.runtime"):
        maintenance.start()
        assert healthy.wait(10)
        maintenance.stop()
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.ERROR
    assert any("works again" in r.getMessage() for r in caplog.records)
