"""The worker's registry presence and its graceful stop, in process, against a real store.

The engine here is a stand-in with the real engine's contract (engine.base.Engine): steps of a
known length, `on_step` after each, the `cancelled` callback between steps, JobCancelled when
every request is dropped. The subprocess tests (tests/cli/test_cli_worker.py) run the same
stop on the tiny model through signals."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from auraserve.config import Settings
from auraserve.core.jobs import JobStatus
from auraserve.core.request import GenerationRequest
from auraserve.engine.base import CancelCheck, JobResult, StepCallback
from auraserve.errors import JobCancelled
from auraserve.media.storage import LocalMediaStore
from auraserve.runtime import Runtime
from auraserve.store import jobs, keys, ledger, workers
from auraserve.worker.loop import Worker, WorkerState
from tests.store_jobs import submit_job

MODEL = "auraflow-v0-3-512"


class _Stepped:
    """Steps of `step_seconds` each; honours `cancelled` between steps like the real engine."""

    description = "stepped test engine (cpu)"
    is_test_model = True

    def __init__(self, step_seconds: float) -> None:
        self.step_seconds = step_seconds

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_step: StepCallback | None = None,
        cancelled: CancelCheck | None = None,
        **_: Any,
    ) -> list[JobResult]:
        steps = requests[0].steps
        dropped: set[int] = set()
        for step in range(1, steps + 1):
            if cancelled is not None:
                dropped |= set(cancelled())
                if len(dropped) == len(requests):
                    raise JobCancelled()
            time.sleep(self.step_seconds)
            if on_step is not None:
                on_step(step, steps)
        return [
            JobResult(
                images=[] if i in dropped else [Image.new("RGB", (r.width, r.height))],
                seeds=[] if i in dropped else [r.seed or 0],
                width=r.width,
                height=r.height,
                prompt_used=r.prompt,
                cancelled=i in dropped,
            )
            for i, r in enumerate(requests)
        ]


def _submit(rt: Runtime, account_id: str, steps: int) -> str:
    return submit_job(rt.db, account_id, {"prompt": "stop", "steps": steps}, model=MODEL)


def _wait_for(rt: Runtime, job_id: str, status: JobStatus, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        job = jobs.get(rt.db, job_id)
        if (
            job is not None
            and job.status == status
            and (status != JobStatus.PROCESSING or job.progress_step >= 1)
        ):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


def _kinds(rt: Runtime, account_id: str) -> list[object]:
    return [e["kind"] for e in ledger.entries(rt.db, account_id)]


def test_a_worker_registers_heartbeats_while_idle_and_marks_itself_stopped(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={"heartbeat_seconds": 0.2, "worker_id": "gpu-7"})
    rt = Runtime.open(settings, engine=_Stepped(0.01))
    try:
        worker = rt.start_worker(models=[MODEL])
        assert worker.worker_id == "gpu-7"
        deadline = time.monotonic() + 10
        while worker.state != WorkerState.READY:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        (first,) = workers.list_workers(rt.db)
        time.sleep(0.6)  # idle: no batch, yet the presence heartbeat goes on
        (later,) = workers.list_workers(rt.db)
        assert later.last_seen_at > first.last_seen_at
        assert (later.id, later.models, later.state) == ("gpu-7", [MODEL], "ready")
        assert later.device == "stepped test engine (cpu)"
        assert workers.live_models(rt.db, settings.worker_stale_seconds) >= {MODEL}
    finally:
        rt.close()
    rt = Runtime.open(settings)
    try:
        (row,) = workers.list_workers(rt.db)
        assert row.state == "stopped" and row.stopped_at is not None
    finally:
        rt.close()


def test_stop_lets_the_batch_in_hand_finish_within_the_grace(settings: Settings) -> None:
    rt = Runtime.open(settings, engine=_Stepped(0.05))
    try:
        acct = keys.create_account(rt.db, "w", credits=10_000)
        job_id = _submit(rt, acct.account_id, steps=20)  # about 1 s
        worker = rt.start_worker(models=[MODEL])
        _wait_for(rt, job_id, JobStatus.PROCESSING)
        assert worker.stop(grace=30)
        job = jobs.get(rt.db, job_id)
        assert job is not None and job.status == JobStatus.COMPLETED
        assert _kinds(rt, acct.account_id).count("capture") == 1
    finally:
        rt.close()


def test_past_the_grace_the_batch_goes_back_to_the_queue_without_an_attempt(
    settings: Settings,
) -> None:
    rt = Runtime.open(settings, engine=_Stepped(0.1))
    try:
        acct = keys.create_account(rt.db, "w", credits=10_000)
        job_id = _submit(rt, acct.account_id, steps=100)  # about 10 s
        queued_behind = _submit(rt, acct.account_id, steps=50)  # another batch key: not claimed
        worker = rt.start_worker(models=[MODEL])
        _wait_for(rt, job_id, JobStatus.PROCESSING)
        started = time.monotonic()
        assert worker.stop(grace=0.3)
        took = time.monotonic() - started
        # The grace and the step in flight (~0.4 s), far from the job's 10 s; the margin is for
        # a loaded CI machine (2.3 s was seen there once in a full run).
        assert 0.3 <= took < 4.0, took
        job = jobs.get(rt.db, job_id)
        assert job is not None
        assert job.status == JobStatus.QUEUED and job.attempts == 0 and job.lease_owner is None
        # Not settled (no capture, no release): the reservation waits for the next attempt.
        assert _kinds(rt, acct.account_id) == ["grant", "reserve", "reserve"]
        behind = jobs.get(rt.db, queued_behind)
        assert behind is not None and behind.status == JobStatus.QUEUED and behind.attempts == 0
        assert worker.finished
    finally:
        rt.close()


def test_hurry_hands_back_at_once(settings: Settings) -> None:
    rt = Runtime.open(settings, engine=_Stepped(0.05))
    try:
        acct = keys.create_account(rt.db, "w", credits=10_000)
        job_id = _submit(rt, acct.account_id, steps=100)
        worker = rt.start_worker(models=[MODEL])
        _wait_for(rt, job_id, JobStatus.PROCESSING)
        hurry = threading.Event()
        threading.Timer(0.2, hurry.set).start()  # the second signal
        started = time.monotonic()
        assert worker.stop(grace=60, hurry=hurry)
        assert time.monotonic() - started < 2.0
        job = jobs.get(rt.db, job_id)
        assert job is not None and job.status == JobStatus.QUEUED and job.attempts == 0
    finally:
        rt.close()


def test_a_client_cancel_during_a_stop_stays_a_cancel(settings: Settings) -> None:
    """Handing back is for the server's stop; a job the client cancelled ends CANCELLED."""
    rt = Runtime.open(settings, engine=_Stepped(0.05))
    try:
        acct = keys.create_account(rt.db, "w", credits=10_000)
        job_id = _submit(rt, acct.account_id, steps=100)
        worker = rt.start_worker(models=[MODEL])
        _wait_for(rt, job_id, JobStatus.PROCESSING)
        worker.request_stop()
        jobs.cancel(rt.db, job_id, account_id=acct.account_id)
        job = _wait_for(rt, job_id, JobStatus.CANCELLED, timeout=10)
        assert job.error == "cancelled by the client"
        assert worker.stop(grace=5)
        assert _kinds(rt, acct.account_id).count("release") == 1
    finally:
        rt.close()


def test_a_worker_never_started_stops_at_once(settings: Settings) -> None:
    rt = Runtime.open(settings)
    try:
        worker = Worker(db=rt.db, settings=settings, engine=_Stepped(0.01), media=rt.media)
        started = time.monotonic()
        assert worker.stop(grace=30)
        assert time.monotonic() - started < 0.5
    finally:
        rt.close()


class _SlowDisk(LocalMediaStore):
    """A disk slower than the lease: each image takes `seconds` to write."""

    def __init__(self, root: Path, seconds: float) -> None:
        super().__init__(root)
        self.seconds = seconds

    def put(self, name: str, data: bytes) -> None:
        time.sleep(self.seconds)
        super().put(name, data)


def test_the_lease_is_kept_while_a_batch_stores_its_images(settings: Settings) -> None:
    """Storing a batch's images can outlast a lease: the heartbeat must keep every job of the
    batch leased until it is settled, or the rescue sweep requeues jobs whose worker is alive
    and they run twice."""
    settings = settings.model_copy(
        update={"lease_seconds": 1.0, "heartbeat_seconds": 0.2, "sweep_interval_seconds": 0.2}
    )
    rt = Runtime.open(settings, engine=_Stepped(0.01))
    try:
        rt.media = _SlowDisk(settings.media_dir, seconds=0.8)
        rt.start_maintenance()  # the sweep that would requeue a lapsed lease
        acct = keys.create_account(rt.db, "w", credits=10_000)
        ids = [_submit(rt, acct.account_id, steps=2) for _ in range(3)]  # one batch, ~2.4 s
        rt.start_worker(models=[MODEL])
        done = [_wait_for(rt, job_id, JobStatus.COMPLETED, timeout=30) for job_id in ids]
        assert [job.attempts for job in done] == [1, 1, 1]
        assert not any("started on" in m for job in done for _, m in job.logs[1:])
        assert _kinds(rt, acct.account_id).count("capture") == 3
    finally:
        rt.close()
