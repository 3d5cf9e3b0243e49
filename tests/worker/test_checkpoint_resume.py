"""A worker SIGKILLed mid-job: the next worker resumes from the newest step checkpoint, not from
step 0, and the image equals an uninterrupted run's, bit for bit (fp32, CPU, tiny model).

Real `auraserve worker` processes over the test's store and media directory (as two machines
sharing PostgreSQL and a bucket would), a stochastic sampler with history (dpmpp_2m_sde), and
the status a client would poll."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

from auraserve.config import Settings
from auraserve.core.jobs import Job, JobStatus
from auraserve.core.status import status_body
from auraserve.runtime import Runtime
from auraserve.store import checkpoints, jobs, keys
from tests.store_jobs import MODEL, submit_job

REQUEST = {
    "prompt": "a lighthouse at dusk",
    "steps": 30,
    "width": 512,
    "height": 512,
    "seed": 1234,
    "sampler": "dpmpp_2m_sde",
    "scheduler": "karras",
    "num_images": 1,
}


def _worker(settings: Settings, worker_id: str) -> subprocess.Popen[str]:
    env = dict(
        os.environ,
        # The test's own data dir: the store and the media directory both workers share.
        AURASERVE_DATA_DIR=str(settings.data_dir),
        AURASERVE_DATABASE_URL=settings.database_url or settings.resolved_database_url,
        AURASERVE_WORKER_ID=worker_id,
        AURASERVE_CHECKPOINT_SECONDS="0.2",
        AURASERVE_LEASE_SECONDS="2",
        AURASERVE_HEARTBEAT_SECONDS="0.5",
        AURASERVE_SWEEP_INTERVAL_SECONDS="0.5",
        AURASERVE_POLL_INTERVAL_SECONDS="0.2",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "auraserve", "worker", "--model", "tiny", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if f"worker {worker_id} ready" in line:
            return proc
    raise AssertionError(f"worker exited with {proc.wait()} before it was ready")


def _until(runtime: Runtime, job_id: str, done: Any, timeout: float = 240) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = jobs.get(runtime.db, job_id)
        assert job is not None
        if done(job):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


def _pixels(runtime: Runtime, job: Job) -> list[bytes]:
    assert job.output is not None, job
    images = []
    for name in job.output["media"]:
        data = runtime.media.get(name)
        assert data is not None, name
        images.append(Image.open(io.BytesIO(data)).convert("RGB").tobytes())
    return images


def test_a_killed_workers_job_resumes_from_its_checkpoint_with_the_same_image(
    settings: Settings, runtime: Runtime
) -> None:
    account = keys.create_account(runtime.db, "resume", credits=1_000_000)
    first = _worker(settings, "gpu-a")
    second: subprocess.Popen[str] | None = None
    try:
        job_id = submit_job(runtime.db, account.account_id, REQUEST, model=MODEL)

        def far_enough(job: Job) -> bool:
            found = checkpoints.of_jobs(runtime.db, [job.id]).get(job.id)
            return found is not None and 4 <= found.step <= 20

        _until(runtime, job_id, far_enough)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        killed_at = checkpoints.of_jobs(runtime.db, [job_id])[job_id].step
        assert jobs.get(runtime.db, job_id).status == JobStatus.PROCESSING  # type: ignore[union-attr]

        second = _worker(settings, "gpu-b")  # its sweep requeues the job when the lease lapses
        resumed = _until(runtime, job_id, lambda j: j.progress_resumed_from is not None)
        assert resumed.lease_owner == "gpu-b" and resumed.attempts == 2
        # The checkpoint it resumed from is the dead worker's newest (written before the kill).
        assert resumed.progress_resumed_from == killed_at
        progress = status_body(resumed, lambda name: name)["progress"]
        assert progress["resumed_from"] == killed_at and progress["step"] >= killed_at
        done = _until(runtime, job_id, lambda j: j.is_terminal)
        assert done.status == JobStatus.COMPLETED, done.error

        # The same request run start to finish by the same worker: the same pixels.
        reference_id = submit_job(runtime.db, account.account_id, REQUEST, model=MODEL)
        reference = _until(runtime, reference_id, lambda j: j.is_terminal)
        assert reference.status == JobStatus.COMPLETED and reference.progress_resumed_from is None
        assert _pixels(runtime, done) == _pixels(runtime, reference)

        # Ended jobs hold no checkpoint: rows dropped, their objects deleted (what a killed
        # worker wrote but never recorded is an orphan for the sweep).
        assert checkpoints.of_jobs(runtime.db, [job_id, reference_id]) == {}
        left = list(Path(settings.media_dir).rglob("*.ckpt"))
        assert len(left) <= 1, left
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(30)
