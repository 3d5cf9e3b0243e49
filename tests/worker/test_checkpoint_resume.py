"""A worker SIGKILLed mid-job: the next worker resumes from the newest step checkpoint, not from
step 0, and the image equals an uninterrupted run's, bit for bit (fp32, CPU, tiny model).

Real `auraserve worker` processes over the test's store and media directory (as two machines
sharing PostgreSQL and a bucket would), a stochastic sampler with history (dpmpp_2m_sde), and
the status a client would poll."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from auraserve.config import Settings
from auraserve.core.jobs import Job, JobStatus
from auraserve.core.lora import available_loras
from auraserve.core.status import status_body
from auraserve.runtime import Runtime
from auraserve.store import checkpoints, jobs, keys
from tests.store_jobs import MODEL, submit_job

REQUEST = {
    "prompt": "a lighthouse at dusk",
    "steps": 60,
    "width": 512,
    "height": 512,
    "seed": 1234,
    "sampler": "dpmpp_2m_sde",
    "scheduler": "karras",
    "num_images": 1,
    "guidance_scale": 3.5,
}


def _worker(settings: Settings, worker_id: str) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        # The test's own data dir: the store and the media directory both workers share.
        AURASERVE_DATA_DIR=str(settings.data_dir),
        AURASERVE_DATABASE_URL=settings.database_url or settings.resolved_database_url,
        AURASERVE_WORKER_ID=worker_id,
        AURASERVE_LORA_DIR=str(Path(settings.data_dir) / "loras"),
        AURASERVE_CHECKPOINT_SECONDS="0.2",
        AURASERVE_LEASE_SECONDS="2",
        AURASERVE_HEARTBEAT_SECONDS="0.5",
        AURASERVE_SWEEP_INTERVAL_SECONDS="0.5",
        AURASERVE_POLL_INTERVAL_SECONDS="0.2",
    )
    log_path = Path(settings.data_dir) / f"{worker_id}.log"  # read by the failure message
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "auraserve", "worker", "--model", "tiny", "--device", "cpu"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 120
    while f"worker {worker_id} ready" not in log_path.read_text(errors="replace"):
        assert proc.poll() is None, log_path.read_text(errors="replace")
        assert time.monotonic() < deadline, log_path.read_text(errors="replace")
        time.sleep(0.1)
    return proc


def _logs(settings: Settings) -> str:
    return "\n".join(
        f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}"
        for path in sorted(Path(settings.data_dir).glob("*.log"))
    )


def _until(runtime: Runtime, job_id: str, done: Any, timeout: float = 240) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = jobs.get(runtime.db, job_id)
        assert job is not None
        if done(job):
            return job
        assert time.monotonic() < deadline, (job, _logs(runtime.settings))
        time.sleep(0.02)


def _pixels(runtime: Runtime, job: Job) -> list[bytes]:
    assert job.output is not None, job
    images = []
    for name in job.output["media"]:
        data = runtime.media.get(name)
        assert data is not None, name
        images.append(Image.open(io.BytesIO(data)).convert("RGB").tobytes())
    return images


def _input_image() -> str:
    """A 512² PNG as a data URL: a gradient, so image-to-image has something to keep."""
    pixels = bytes((x // 2) % 256 for _ in range(512) for x in range(512 * 3))
    buffer = io.BytesIO()
    Image.frombytes("RGB", (512, 512), pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# (sampler, scheduler, what both jobs of the batch add): CFG on one job and not the other, a
# batch of 2 + 1 images; then a LoRA and image-to-image on a third sampler family.
CASES = {
    "sde-cfg": ("dpmpp_2m_sde", "karras", {}),
    "lms-cfg": ("lms", "exponential", {}),
    "lora-img2img": (
        "euler_ancestral",
        "beta",
        {"loras": [{"name": "style", "scale": 1.0}], "strength": 0.7, "image": "input"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_killed_workers_batch_resumes_from_its_checkpoints_with_the_same_images(
    settings: Settings, runtime: Runtime, case: str
) -> None:
    """Two jobs that share a batch (one with two images) die together at a step and resume
    together; each image equals the one an uninterrupted run of its request gives."""
    sampler, scheduler, extra = CASES[case]
    if extra.get("image") == "input":
        extra = {**extra, "image": _input_image()}
    registry = None
    if "loras" in extra:
        from tests.engine.test_lora import save_adapter

        save_adapter(Path(settings.data_dir) / "loras" / "style", rank=4, alpha=8, seed=1)
        registry = available_loras(Path(settings.data_dir) / "loras", [])
    account = keys.create_account(runtime.db, "resume", credits=1_000_000)
    common = {**REQUEST, **extra, "sampler": sampler, "scheduler": scheduler}
    requests = [
        {**common, "seed": 7, "num_images": 2},
        {**common, "seed": 8, "guidance_scale": 1.0},
    ]

    def submit(fields: dict[str, Any]) -> str:
        return submit_job(runtime.db, account.account_id, fields, model=MODEL, loras=registry)

    # Queued before the worker starts: claimed as one batch (a worker already waiting could
    # claim the first before the second is in).
    ids = [submit(r) for r in requests]
    first = _worker(settings, "gpu-a")
    second: subprocess.Popen[bytes] | None = None
    try:

        def far_enough(job: Job) -> bool:
            assert not job.is_terminal, (
                "the job ended before the test saw its checkpoints",
                _logs(runtime.settings),
            )
            found = checkpoints.of_jobs(runtime.db, ids)
            # Usually one step for both; two steps (a kill between their two writes) resume as
            # two groups, which is as right.
            steps = {c.step for c in found.values()}
            return len(found) == 2 and min(steps) >= 4 and max(steps) <= 40

        _until(runtime, ids[0], far_enough)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        found = checkpoints.of_jobs(runtime.db, ids)
        killed_at = {job_id: found[job_id].step for job_id in ids}

        second = _worker(settings, "gpu-b")  # its sweep requeues the jobs when the lease lapses
        for job_id in ids:
            resumed = _until(runtime, job_id, lambda j: j.progress_resumed_from is not None)
            assert resumed.lease_owner == "gpu-b" and resumed.attempts == 2
            # Each resumed from the dead worker's newest checkpoint (written before the kill).
            assert resumed.progress_resumed_from == killed_at[job_id]
            progress = status_body(resumed, lambda name: name)["progress"]
            assert progress["resumed_from"] == killed_at[job_id]
            assert progress["step"] >= killed_at[job_id]
        done = [_until(runtime, job_id, lambda j: j.is_terminal) for job_id in ids]
        assert [j.status for j in done] == [JobStatus.COMPLETED] * 2, [j.error for j in done]

        # The same requests run start to finish by the same worker: the same pixels.
        reference_ids = [
            submit_job(runtime.db, account.account_id, r, model=MODEL, loras=registry)
            for r in requests
        ]
        references = [_until(runtime, job_id, lambda j: j.is_terminal) for job_id in reference_ids]
        for job, reference in zip(done, references, strict=True):
            assert reference.status == JobStatus.COMPLETED
            assert reference.progress_resumed_from is None
            assert _pixels(runtime, job) == _pixels(runtime, reference)

        # Ended jobs hold no checkpoint: rows dropped, their objects deleted (what a killed
        # worker wrote but never recorded is an orphan for the sweep).
        assert checkpoints.of_jobs(runtime.db, [*ids, *reference_ids]) == {}
        left = list(Path(settings.media_dir).rglob("*.ckpt"))
        assert len(left) <= 2, left
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(30)
